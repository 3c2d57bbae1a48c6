#!/usr/bin/env python
"""The workflow's non-training steps: corpus, tokenizer, tokenize, aggregate, figures, report.

    python scripts/study.py corpus --data '{"source": "synthetic", ...}' --seed 1234 --out DIR
    python scripts/study.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmpar.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
