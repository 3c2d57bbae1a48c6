"""Test-only mutation: data-parallel gradients summed instead of averaged (a deleted division).

Tests that train a mutant put this directory on PYTHONPATH, so every Python process they start imports
this module at start-up (Python's ``sitecustomize`` hook); the package knows nothing of it. In a
torchrun worker (``LOCAL_RANK`` set, running ``llmpar.train``; not the processes it starts, such as
torch.compile's compile workers, which would otherwise import the package too) with
``LLMPAR_TEST_SUM_GRADS`` naming runs (comma-separated), those runs (and only those, also when they
share a launch with others) train with

* torch engines (TP x DP, PP x DP): ``torch_common.allreduce_grads_`` returning the sum over the
  data-parallel group: its average times the group size, as if ``flat.div_(size)`` were deleted;
* DeepSpeed engines (ZeRO-0 and ZeRO-1/2 reductions): ``gradient_allreduce_op: sum`` in the run's
  DeepSpeed config, DeepSpeed's own switch from averaging to summing (ZeRO-3 rejects it).
"""

import os
import sys

SUM_RUNS = set(filter(None, os.environ.get("LLMPAR_TEST_SUM_GRADS", "").split(",")))
mutant = False  # whether the run being built is one of SUM_RUNS


def install() -> None:
    import llmpar.strategies as strategies
    from llmpar.strategies import ds_common, pp_torch, torch_common

    averaged_grads, ds_config, parallelize = torch_common.allreduce_grads_, ds_common.ds_config, strategies.parallelize

    def summed_grads(params, group, size):
        averaged_grads(params, group, size)
        if mutant and size > 1:
            for p in params:
                if p.grad is not None:
                    torch_common.local(p.grad).mul_(size)

    def summing_ds_config(*args, **kwargs):
        cfg = ds_config(*args, **kwargs)
        if mutant:
            cfg["gradient_allreduce_op"] = "sum"
        return cfg

    def mutating_parallelize(model, spec, ctx, train_cfg):
        global mutant
        mutant = spec.name in SUM_RUNS
        if mutant:
            print(f"[{spec.name}] test mutation: data-parallel gradients summed, not averaged", flush=True)
        return parallelize(model, spec, ctx, train_cfg)

    torch_common.allreduce_grads_ = pp_torch.allreduce_grads_ = summed_grads
    ds_common.ds_config = summing_ds_config
    strategies.parallelize = mutating_parallelize


if SUM_RUNS and "LOCAL_RANK" in os.environ and "llmpar.train" in sys.orig_argv:
    install()
