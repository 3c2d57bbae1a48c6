"""The dtype autocast computes in: what the hand-written kernels (FlashAttention-4, quack's MLP and norms, the fused
projections) cast their operands to, so that they round where autocast's own operators would."""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor, otherwise: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype autocast computes in on ``t``'s device, ``otherwise`` where autocast is off there."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else otherwise
