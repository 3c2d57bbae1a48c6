"""The decoder's RMSNorms on quack-kernels' kernel, each fused with the residual add before it (``train.norm: quack``).

In transformers' Llama every RMSNorm but the first normalises a residual sum: a decoder layer adds its attention
output to the residual stream and normalises the sum for its MLP, and adds its MLP output at its end, which the next
layer's input norm (or the model's final norm) normalises. Compiled per layer, inductor fuses the add with the norm
inside a layer but not across the layers' boundary, where the sum is written by one graph and read back by the next.
quack's RMSNorm (``quack.rmsnorm.rmsnorm`` with ``residual`` and ``prenorm``) adds a branch output to the stream and
normalises the sum in one kernel that writes both; its backward adds the stream's gradient to the norm's input
gradient in the same pass. Here each decoder layer hands the next its MLP output and the stream unsummed, as a pair
in place of the hidden states (``LlamaModel.forward`` passes each layer's output to the next layer as it is), the
next layer's input norm sums and normalises them, and the model's final norm sums and normalises the last pair.

The parameters stay LlamaRMSNorm's (names, shapes, initial values). Numerics: the sum is formed in fp32 and rounded
to the stream's dtype, as ``residual + hidden_states`` rounds it, and the norm is taken of the fp32 sum; x / rms(x)
is scaled by the weight in fp32 and rounded once, to the autocast dtype under autocast (the dtype the projections
read; LlamaRMSNorm rounds x / rms(x) to the input dtype before the weight, and autocast rounds the product again).
quack-kernels 0.6.5 (requirements/gpu-kernels.txt) on CUDA GPUs; :mod:`llmpar.kernels` refuses a study that cannot
have it.
"""

from __future__ import annotations

import torch

from llmpar.autocast import compute_dtype

_CLASSES: dict = {}


def rmsnorm_function():
    """quack's RMSNorm (imported on first use: importing quack needs a CUDA host's CUTLASS DSL)."""
    from quack.rmsnorm import rmsnorm

    return rmsnorm


def add_norm(norm, branch: torch.Tensor, stream: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm`` (a LlamaRMSNorm's weight and epsilon) of ``branch + stream``, and that sum, the stream the layer goes
    on with; with no ``stream`` (the first layer's input), ``norm`` of ``branch`` and ``branch``."""
    out_dtype = compute_dtype(branch)
    rmsnorm = rmsnorm_function()
    if stream is None:
        return rmsnorm(branch, norm.weight, out_dtype=out_dtype, eps=norm.variance_epsilon), branch
    return rmsnorm(branch, norm.weight, residual=stream, out_dtype=out_dtype, eps=norm.variance_epsilon,
                   prenorm=True)


def final_norm(norm, branch: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """``norm`` of ``branch + stream`` alone (the model's last norm: nothing reads the sum after it, so quack's
    backward takes no gradient for it)."""
    return rmsnorm_function()(branch, norm.weight, residual=stream, out_dtype=compute_dtype(branch),
                              eps=norm.variance_epsilon)


def quack_norm_classes() -> dict:
    """The decoder layer and final norm classes, subclasses of the installed transformers' Llama ones (built once,
    on first use, so that importing this module needs no transformers)."""
    if _CLASSES:
        return _CLASSES
    from transformers.models.llama import modeling_llama as llama

    class QuackNormDecoderLayer(llama.LlamaDecoderLayer):
        """LlamaDecoderLayer's training forward with each residual add fused into the norm after it: takes the
        hidden states, or the previous layer's (MLP output, stream) pair, and returns its own pair."""

        def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None,
                    **kwargs):
            branch, stream = hidden_states if isinstance(hidden_states, tuple) else (hidden_states, None)
            hidden, stream = add_norm(self.input_layernorm, branch, stream)
            hidden, _ = self.self_attn(hidden_states=hidden, attention_mask=attention_mask,
                                       position_ids=position_ids, position_embeddings=position_embeddings, **kwargs)
            hidden, stream = add_norm(self.post_attention_layernorm, hidden, stream)
            return self.mlp(hidden), stream

    class QuackFinalNorm(llama.LlamaRMSNorm):
        """The model's final norm of the last layer's (MLP output, stream) pair: the norm of their sum."""

        def forward(self, hidden_states):
            if not isinstance(hidden_states, tuple):
                raise TypeError("norm quack's final norm takes the last decoder layer's (MLP output, stream) pair; "
                                f"it got a {type(hidden_states).__name__}")
            return final_norm(self, *hidden_states)

    _CLASSES.update(layer=QuackNormDecoderLayer, final=QuackFinalNorm)
    return _CLASSES


def use_quack_norm(model) -> None:
    """Give every decoder layer and the final norm quack's RMSNorm with the residual adds fused (``train.norm:
    quack``)."""
    classes = quack_norm_classes()
    for layer in model.model.layers:
        if type(layer).__name__ != "LlamaDecoderLayer":
            raise TypeError(f"train.norm quack replaces LlamaDecoderLayer; this layer is a {type(layer).__name__}")
        layer.__class__ = classes["layer"]
    if type(model.model.norm).__name__ != "LlamaRMSNorm":
        raise TypeError(f"train.norm quack replaces the final LlamaRMSNorm; this one is a "
                        f"{type(model.model.norm).__name__}")
    model.model.norm.__class__ = classes["final"]
