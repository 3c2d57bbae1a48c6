"""FlashAttention-4 as a torch custom op, registered as the transformers attention implementation ``llmpar_fa4``.

transformers' own ``flash_attention_4`` calls FA4's ``autograd.Function``, which torch.compile cannot trace (its
kernels are CuTe DSL programs compiled when first called): each compiled decoder layer breaks its graph there,
and the fp32 query and key that rotary embedding leaves under autocast are cast to bf16 by separate eager
kernels. As a custom op with a fake (shape-only) implementation, the attention stays one node of the layer's
graph and inductor writes rotary embedding's output straight into the bf16 layout the kernel reads.
Forward and backward call FA4's ``_flash_attn_fwd`` and ``_flash_attn_bwd`` (:func:`flash_kernels`;
flash-attn-4 4.0.0b40, pinned in requirements/gpu-kernels.txt: private entry points, which a new version may
change). Causal attention, no mask, bf16 or fp16 inputs (cast to the autocast dtype where autocast is on, as
transformers does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmpar.autocast import compute_dtype

IMPLEMENTATION = "llmpar_fa4"


def flash_kernels():
    """FA4's forward and backward entry points (imported on first use: importing them needs a CUDA host)."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    return _flash_attn_fwd, _flash_attn_bwd


@torch.library.custom_op("llmpar::fa4_forward", mutates_args=())
def fa4_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention of contiguous (batch, seq, heads, head dim) tensors: the output and the log-sum-exp."""
    forward, _ = flash_kernels()
    out, lse, *_ = forward(q, k, v, softmax_scale=scale, causal=True, return_lse=True)
    return out.contiguous(), lse.contiguous()  # the layouts the fake promises (no copy where they are already)


@fa4_forward.register_fake
def _(q, k, v, scale):
    b, s, h, _ = q.shape
    return q.new_empty(b, s, h, v.shape[-1]), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("llmpar::fa4_backward", mutates_args=())
def fa4_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 scale: float) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = flash_kernels()
    dq, dk, dv = backward(q, k, v, out, dout, lse, scale, True)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@fa4_backward.register_fake
def _(dout, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = fa4_backward(dout.contiguous(), q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


fa4_forward.register_autograd(_backward, setup_context=_setup)


def fa4_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: (batch, heads, seq, head dim) in, (batch, seq, heads, head dim) out."""
    if attention_mask is not None:
        raise ValueError("llmpar_fa4 trains causal attention without a mask; this batch has one")
    if dropout:
        raise ValueError("llmpar_fa4 has no attention dropout")
    dtype = compute_dtype(query, query.dtype)
    q, k, v = (t.transpose(1, 2).to(dtype).contiguous() for t in (query, key, value))
    out, _ = fa4_forward(q, k, v, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out, None


def register() -> None:
    """Make ``llmpar_fa4`` an attention implementation of transformers, with the flash implementations' mask
    (None for causal attention without padding)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(IMPLEMENTATION, fa4_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)
