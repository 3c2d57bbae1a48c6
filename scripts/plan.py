#!/usr/bin/env python
"""Predict each run of a study (peak memory per rank, step time, tokens/s, MFU) on a card, and compare
with the recorded runs under results/<study>/runs/ where they exist; runs not yet recorded are listed
with their predictions (and whether they fit the card).

    python scripts/plan.py --config configs/h200-1b.yaml   # on its train.card; table + results/h200-1b/plan.csv
    python scripts/plan.py --config configs/gpu2-1b.yaml --gpu h200   # another card than the study's
"""

import argparse
import sys

from llmpar.cli import plan_study
from llmpar.errors import UserError

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="study config (its recorded runs are compared)")
    p.add_argument("--gpu", help="card constants to predict with (a key of src/llmpar/cards.yaml); default: the "
                   "study's train.card, required where it names none")
    p.add_argument("--out", help="CSV to write (default results/<study>/plan.csv)")
    a = p.parse_args()
    try:
        print(plan_study(a.config, a.gpu, a.out))
    except UserError as exc:
        sys.exit(f"error: {exc}")
