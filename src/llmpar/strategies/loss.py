"""The one loss of every engine: mean next-token cross-entropy, compiled on CUDA where asked."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1))


_FUSED_CE = None


def fused_cross_entropy():
    """The same cross-entropy, compiled (CUDA only): the fp32 upcast, log-sum-exp, gather and, in
    backward, the softmax gradient fuse into a few kernels that read the bf16 logits once, instead of
    materialising fp32 logits, log-probabilities and their gradients (~6 passes over B·s·V·4 bytes)."""
    global _FUSED_CE
    if _FUSED_CE is None:
        _FUSED_CE = torch.compile(cross_entropy, dynamic=False)
    return _FUSED_CE


def cross_entropy_for(device: torch.device, fused: bool):
    """The one loss function of every engine: the compiled cross-entropy on CUDA where ``fused``
    (``train.fused_loss``), the eager one elsewhere. ``(logits, labels) -> mean loss``; labels already
    shifted."""
    return fused_cross_entropy() if device.type == "cuda" and fused else cross_entropy


def causal_lm_loss(model, inputs: torch.Tensor, labels: torch.Tensor, loss_fn=cross_entropy) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` with ``loss_fn`` (the engine's :func:`cross_entropy_for`;
    labels are already shifted by the data loader). DTensor logits (a TP-sharded lm_head) take the eager
    function."""
    logits = model(input_ids=inputs).logits
    return (loss_fn if type(logits) is torch.Tensor else cross_entropy)(logits, labels)


