"""The runs that tests/test_resume.py and tests/test_observed.py check, trained in two launches per
process layout (2 processes; 4 processes on one node).

Every run of ``victims`` checkpoints at step 3 and stalls at step 5 in its first attempt (fault ``stall``).
The first launch trains the victims one after another; once a victim's step-3 checkpoint is complete, step 4
is logged and it has logged its stall, the test copies its directory to ``<name>``, the state that a SIGKILL
at that moment leaves, and releases it to finish in ``<name>_ref`` as the uninterrupted run. The last victim
is SIGKILLed for real, with its launch, after the runs of ``extras`` (whose observed behaviour: compile,
checkpointing, resharding, schedules, precision, the tests check). The second launch resumes every victim
in ``<name>`` and trains the killed one's uninterrupted reference. Every run is BASE_CONFIG's: 6 steps of
global batch 8, fp32 unless it says otherwise.
"""

from __future__ import annotations

from pathlib import Path

from conftest import make_config
from launches import copy_when_stalled, job, kill_when_stalled, run_batch, start_batch

CHECKPOINT_STEP, STALL_STEP = 3, 5
STALL_TRAIN = {"checkpoint_every": CHECKPOINT_STEP, "log_every": 1}

TWO = {"gpus_per_node": 2}
PP = {"strategy": "pipeline_parallel", "stages": 2, "micro_batches": 4}
LAYOUTS = {
    "two": {
        "victims": {
            "ddp": {"strategy": "data_parallel", **TWO},
            "fsdp": {"strategy": "fsdp", **TWO},
            "tp": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "torch"},
            "zero2_offload": {"strategy": "zero", "zero_stage": 2, "offload": "optimizer", **TWO},
            "pp_torch": {**PP, "schedule": "1f1b", "pp_engine": "torch"},
            "pp_deepspeed": {**PP, "pp_engine": "deepspeed"},
            "zero1": {"strategy": "zero", "zero_stage": 1, **TWO},
            "zero3": {"strategy": "zero", "zero_stage": 3, **TWO},
            "tp_deepspeed": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "deepspeed"},
        },
        "extras": {
            "ddp_accumulate": {"strategy": "data_parallel", "micro_batches": 2, **TWO},
            "fsdp_accumulate": {"strategy": "fsdp", "micro_batches": 2, **TWO},
            "zero1_accumulate": {"strategy": "zero", "zero_stage": 1, "micro_batches": 2, **TWO},
            "fsdp_no_reshard": {"strategy": "fsdp", "reshard_after_forward": False, **TWO},
            "pp_gpipe": {**PP, "schedule": "gpipe", "pp_engine": "torch"},
            "fsdp_ac": {"strategy": "fsdp", "activation_checkpointing": "full", **TWO},
            "pp_ac": {**PP, "schedule": "1f1b", "pp_engine": "torch", "activation_checkpointing": "selective"},
            "fsdp_compile": {"strategy": "fsdp", "compile": True, **TWO},
            "pp_compile": {**PP, "schedule": "1f1b", "pp_engine": "torch", "compile": True},
            "tp_compile": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "torch", "compile": True},
            "tp_accumulate": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "torch", "micro_batches": 2},
            "tp_deepspeed_accumulate": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "deepspeed",
                                        "micro_batches": 2},
            "ddp_bf16": {"strategy": "data_parallel", "precision": "bf16", **TWO},
            "fsdp_bf16": {"strategy": "fsdp", "precision": "bf16", **TWO},
            "ddp_bf16_pure": {"strategy": "data_parallel", "precision": "bf16-pure", **TWO},
            "ddp_bf16_residual": {"strategy": "data_parallel", "precision": "bf16-residual", **TWO},
            "fsdp_bf16_residual": {"strategy": "fsdp", "precision": "bf16-residual", **TWO},
            "pp_bf16_residual": {**PP, "schedule": "1f1b", "pp_engine": "torch", "precision": "bf16-residual"},
            "zero3_bf16_residual": {"strategy": "zero", "zero_stage": 3, "precision": "bf16-residual", **TWO},
            "pp_deepspeed_bf16_residual": {**PP, "pp_engine": "deepspeed", "precision": "bf16-residual"},
            "tp_bf16_residual": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "torch",
                                 "precision": "bf16-residual"},
            "tp_deepspeed_bf16_residual": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "deepspeed",
                                           "precision": "bf16-residual"},
        },
    },
    "four": {
        "victims": {
            "pp_tp_3d": {"strategy": "hybrid_parallel", "stages": 2, "tp": 2, "gpus_per_node": 4,
                         "tp_engine": "torch", "pp_engine": "torch"},
            "pp_dp_hybrid": {"strategy": "hybrid_parallel", "stages": 2, "micro_batches": 4, "gpus_per_node": 4,
                             "pp_engine": "torch", "schedule": "1f1b"},
            "fsdp_tp": {"strategy": "fsdp", "tp": 2, "tp_engine": "torch", "gpus_per_node": 4},
        },
        "extras": {
            "tp_dp": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "torch", "gpus_per_node": 4},
            "tp_deepspeed_dp": {"strategy": "tensor_parallel", "tp": 2, "tp_engine": "deepspeed", "gpus_per_node": 4},
            "pp_dp_hybrid_deepspeed": {"strategy": "hybrid_parallel", "stages": 2, "micro_batches": 4,
                                       "gpus_per_node": 4, "pp_engine": "deepspeed"},
        },
    },
}


def stalled_config(victims: dict) -> dict:
    runs = {name: entry | {"fault": {"kind": "stall", "at_step": STALL_STEP}} for name, entry in victims.items()}
    return make_config(runs, train=STALL_TRAIN)


def train_layout(layout: str, tokens: Path, root: Path) -> dict:
    """Train one layout's two launches. Returns {"dir": {run: output directory}, "killed_steps": {victim: steps
    logged when copied or killed}, "resume_log": {victim: log of the launch that resumed it}}."""
    victims, extras = LAYOUTS[layout]["victims"], LAYOUTS[layout]["extras"]
    *released, killed = victims
    plain = make_config({f"{killed}_ref": victims[killed]} | extras)
    stalled = stalled_config(victims)
    dirs = {n: root / n for n in [*victims, *(f"{n}_ref" for n in victims), *extras]}
    result = {"dir": dirs, "killed_steps": {}, "resume_log": {}}
    first = [job(stalled, n, dirs[f"{n}_ref"]) for n in released]
    first += [job(plain, n, dirs[n]) for n in extras] + [job(stalled, killed, dirs[killed])]
    proc, log = start_batch(first, tokens, root, f"{layout}-0")
    for n in released:
        result["killed_steps"][n] = copy_when_stalled(proc, n, dirs[f"{n}_ref"], dirs[n], CHECKPOINT_STEP,
                                                      STALL_STEP, log)
    result["killed_steps"][killed] = kill_when_stalled(proc, dirs[killed], CHECKPOINT_STEP, STALL_STEP, log)
    second = [job(stalled, n, dirs[n]) for n in victims] + [job(plain, f"{killed}_ref", dirs[f"{killed}_ref"])]
    resumed = run_batch(second, tokens, root, f"{layout}-1")
    result["resume_log"] = dict.fromkeys(victims, resumed)
    return result
