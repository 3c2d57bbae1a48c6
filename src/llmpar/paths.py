"""Where the repository's own files are (the package runs from a checkout: ``pip install -e .``)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "schemas" / "config.schema.yaml"
