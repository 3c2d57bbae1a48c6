#!/usr/bin/env python
"""The workflow's non-training steps: debian-fetch, debian-text, corpus, tokenizer, tokenize, aggregate,
figures, report.

    python scripts/study.py corpus --data '{"source": "synthetic", ...}' --seed 1234 --out DIR
    python scripts/study.py --help
"""

import sys

from llmpar.cli import main

if __name__ == "__main__":
    sys.exit(main())
