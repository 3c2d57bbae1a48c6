"""The first optimizer step's update of a few named parameters, measured on any layout.

For each tracked parameter (see :func:`tracked_names`) the run reports ``||w_1 - w_0||``, the L2 norm
of its change over step 1 (DEFINITIONS["first_update_norm"]). Each rank copies what it holds of the
parameter to host memory before the step (no device memory, no effect on the measured peak) and
compares after it; the squared differences and the element counts are summed over all ranks. An
element held by k ranks (data-parallel replicas, ZeRO-1/2, an embedding replicated over tensor-parallel
ranks) is counted once: k = round(elements held in total / elements of the parameter), which also
covers shards padded to equal size (ZeRO-3).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

# name segments that wrappers insert between the model's own (torch.compile, activation checkpointing)
WRAPPERS = {"_orig_mod", "_checkpoint_wrapped_module"}


def tracked_names(config) -> list[str]:
    """The embedding, the first layer's q_proj, the last layer's down_proj and lm_head: on the first and
    last pipeline stage, column- and row-parallel under TP, replicated and vocabulary-split matrices."""
    last = config.num_hidden_layers - 1
    return ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            f"model.layers.{last}.mlp.down_proj.weight", "lm_head.weight"]


def model_name(name: str) -> str:
    """A parameter's name in the plain model (wrapper segments removed)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPERS)


def local_shard(p: torch.Tensor) -> torch.Tensor | None:
    """What this rank holds of parameter ``p``: ZeRO-3's partition, a DTensor's local shard, the tensor
    itself, or None (DeepSpeed's pipeline moves the other stages' parameters to the meta device)."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    if hasattr(p, "to_local"):  # a DTensor (told apart as engine.tensor_bytes does, without importing its module)
        return p.to_local()
    return None if p.is_meta else p


class FirstUpdate:
    """``snapshot(named)`` before step 1, ``norms(named, device)`` after it (a collective: every rank);
    ``named``: the weights the optimizer updates by parameter name (``engine.named_weights(model)``)."""

    def __init__(self, model):
        """``model``: the plain model, before a strategy shards it (the full size of each parameter)."""
        names = tracked_names(model.config)
        self.numel = {n: p.numel() for n, p in model.named_parameters() if n in names}
        self.before: dict[str, torch.Tensor] = {}

    def _held(self, named) -> dict[str, torch.Tensor]:
        """The tracked parameters' shards on this rank (a torch pipeline stage drops the others)."""
        held = {}
        for name, p in named:
            shard = local_shard(p)
            if model_name(name) in self.numel and shard is not None:
                held[model_name(name)] = shard.detach()
        return held

    def snapshot(self, named) -> None:
        self.before = {n: s.to("cpu", torch.float64, copy=True) for n, s in self._held(named).items()}

    def norms(self, named, device) -> dict[str, float]:
        names = sorted(self.numel)
        held = self._held(named)
        sums = torch.zeros(2, len(names), dtype=torch.float64)  # squared differences, elements held
        for i, name in enumerate(names):
            if name in held:
                diff = held[name].to("cpu", torch.float64) - self.before[name]
                sums[0, i], sums[1, i] = diff.square().sum(), diff.numel()
        sums = sums.to(device)
        dist.all_reduce(sums)
        sq, held_total = sums.cpu().tolist()
        return {name: math.sqrt(sq[i] / round(held_total[i] / self.numel[name])) for i, name in enumerate(names)}
