#!/usr/bin/env python
"""The batch-size sweep's target: the validation loss its reference batch reaches after a given number of
tokens, measured in a pilot run of the sweep's own config, and written into a copy of that config.

    python benchmarks/sweep_target.py --config configs/batch-sweep.yaml --tokens results/<study>/data/tokens \
        --out results/<study>/pilot --write /tmp/batch-sweep.yaml

The pilot trains the config's baseline run (its reference batch) for ``--budget`` tokens without stopping,
evaluating as the sweep does; the target is its validation loss at ``--at`` tokens (interpolated between the
two evaluations that bracket it), rounded up to 0.05 nats. The pilot's run directory stays beside the sweep's
runs, so the choice can be checked against it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from llmpar.config import load_yaml, prepare, run_config  # noqa: E402
from llmpar.io import read_jsonl  # noqa: E402
from llmpar.metrics.definitions import val_loss_at_tokens  # noqa: E402


def pilot_config(raw: dict, budget: int) -> dict:
    """The sweep's config with one run, its baseline, trained for ``budget`` tokens without stopping."""
    ref = raw["baseline"]
    train = {**raw["train"], "train_tokens": budget, "stop_at_target": False, "target_loss": None}
    return {**raw, "recorded": False, "train": train, "runs": {ref: raw["runs"][ref]}}


def choose(evals: list[dict], at_tokens: int) -> float:
    loss = val_loss_at_tokens(evals, at_tokens)
    if loss is None:
        raise SystemExit(f"the pilot's evaluations do not reach {at_tokens} tokens")
    return math.ceil(loss * 20) / 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--tokens", required=True, help="the sweep's token shards")
    p.add_argument("--out", required=True, help="the pilot's run directory")
    p.add_argument("--write", required=True, help="the config with the chosen target_loss")
    p.add_argument("--at", type=int, default=3_000_000, help="tokens at which the target is read")
    p.add_argument("--budget", type=int, default=4_000_000, help="tokens the pilot trains")
    a = p.parse_args()
    raw = load_yaml(a.config)
    cfg = prepare(pilot_config(raw, a.budget))
    rc = run_config(cfg, raw["baseline"])
    code = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--run-config", json.dumps(rc),
                           "--tokens", a.tokens, "--out", a.out]).returncode
    if code:
        return code
    target = choose(read_jsonl(Path(a.out) / "evals.jsonl"), a.at)
    text = Path(a.config).read_text()
    line = [x for x in text.splitlines() if x.strip().startswith("target_loss:")]
    if len(line) != 1:
        raise SystemExit(f"{a.config}: expected one train.target_loss line, found {len(line)}")
    indent = line[0][: len(line[0]) - len(line[0].lstrip())]
    Path(a.write).write_text(text.replace(line[0], f"{indent}target_loss: {target}  # from the pilot ({a.at} tokens)"))
    print(f"target_loss {target}: the pilot's validation loss at {a.at:,} tokens, rounded up to 0.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
