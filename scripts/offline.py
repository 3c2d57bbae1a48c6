#!/usr/bin/env python3
"""The study on a GPU host without internet: wheelhouse, install, study, test-gpu (src/llmpar/offline.py).

    python scripts/offline.py --help
    python scripts/offline.py SUBCOMMAND --help
"""

import sys
from pathlib import Path

# On the GPU host this runs before anything is installed: the checkout's package, not an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from llmpar.offline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
