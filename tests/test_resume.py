"""Killed mid-run, then rerun: every engine family resumes from its own checkpoint format and trains
exactly what the same run trains uninterrupted.

Families: torch DCP replicated (DDP) and sharded (FSDP2, torch TP, FSDP2 x TP), DeepSpeed ZeRO-1, ZeRO-2
with the optimizer offloaded, ZeRO-3 and AutoTP, both pipeline engines (torch 1F1B, DeepSpeed), and the
hybrids (PP2 x DP2 and 3-D PP2 x TP2, torch). Each run checkpoints at step 3 and stalls at step 5 in its
first attempt, once the checkpoint's completion marker exists and step 4 is logged (read here with the
test's own reader): the last victim of each process layout is SIGKILLed with its launch (launcher, torchrun
agents and workers), every other one is copied as it stands, the state a SIGKILL then leaves, and released
to finish as the uninterrupted run (tests/shared_study.py). The rerun must resume from step 3, redo step 4,
and give the uninterrupted run's losses bit for bit (CPU, fp32, deterministic reductions).
"""

import pytest
from conftest import read_run
from shared_study import CHECKPOINT_STEP, LAYOUTS, STALL_STEP

pytestmark = pytest.mark.slow

VICTIMS = [(layout, name) for layout, plan in LAYOUTS.items() for name in plan["victims"]]


@pytest.mark.parametrize("layout, name", VICTIMS, ids=[name for _, name in VICTIMS])
def test_killed_run_resumes_and_matches_the_uninterrupted_run(layout, name, shared_two, shared_four):
    shared = {"two": shared_two, "four": shared_four}[layout]
    # killed mid-run: the steps before the stall logged, none after
    assert shared["killed_steps"][name] == list(range(1, STALL_STEP)), shared["killed_steps"][name]
    assert f"[{name}] resumed from checkpoint step_{CHECKPOINT_STEP:08d} (step {CHECKPOINT_STEP}), attempt 1" \
        in shared["resume_log"][name], shared["resume_log"][name][-4000:]

    summary, steps = read_run(shared["dir"][name])
    ref_summary, ref_steps = read_run(shared["dir"][f"{name}_ref"])
    assert summary["status"] == "ok" and summary["attempts"] == 2
    # one record per step: step 4, trained by both attempts, counts once (the second attempt's)
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert [r["attempt"] for r in steps] == [0] * CHECKPOINT_STEP + [1] * (6 - CHECKPOINT_STEP)
    assert summary["redone_steps"] == STALL_STEP - 1 - CHECKPOINT_STEP
    assert [r["loss"] for r in steps] == [r["loss"] for r in ref_steps]
    assert summary["final_val_loss"] == ref_summary["final_val_loss"]
