"""The one optimizer and learning-rate schedule of every strategy."""

from __future__ import annotations

import math

import torch


def make_optimizer(params, train_cfg: dict) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95), the fused kernel on every device. The same for every strategy.

    Parameters are grouped by kind (plain tensors, and DTensors per device mesh), each group with the
    same hyperparameters: the fused kernel takes one group's tensors in one call, and torch refuses a
    call that mixes plain tensors and DTensors (torch TP keeps the embedding, norms and lm_head as
    plain replicated tensors: ``aten._fused_adamw_.default got mixed torch.Tensor and DTensor``).
    """
    groups: dict[object, list] = {}
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        groups.setdefault(None if mesh is None else id(mesh), []).append(p)
    return torch.optim.AdamW([{"params": ps} for ps in groups.values()], lr=train_cfg["lr"], betas=(0.9, 0.95),
                             eps=1e-8, weight_decay=train_cfg["weight_decay"], fused=True)


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor global-norm clipping scales the gradients by, as torch's ``clip_grad_norm_`` computes it:
    min(1, ``max_norm`` / (``norm`` + 10⁻⁶))."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def lr_lambda(train_cfg: dict):
    """Linear warmup, then cosine decay to min_lr_ratio × lr at the last step (multiplier of lr)."""
    warm, total, floor = train_cfg["warmup_steps"], train_cfg["steps"], train_cfg["min_lr_ratio"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_scheduler(optimizer, train_cfg: dict):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg))


