"""The decoder layers' MLP on quack-kernels' gated GEMMs (``train.mlp: quack``).

LlamaMLP computes ``down(silu(gate(x)) * up(x))`` as three GEMMs and, between them, SwiGLU's elementwise
kernels: in the forward they read the gate/up products and write the product the down projection reads, in the
backward they read its gradient and write the gate/up gradients, each pass over (tokens x intermediate size)
tensors at the memory's bandwidth. quack's gated MLP (``quack.mlp.mlp_func`` with a SwiGLU activation) does
that work in the GEMMs' epilogues: the gate/up GEMM writes SwiGLU's output beside its own, and the down
projection's input-gradient GEMM computes SwiGLU's gradient from the saved gate/up products as it writes. Its
GEMMs are torch custom ops with shape-only implementations, so a compiled decoder layer keeps them in its graph.

The parameters stay the three ``nn.Linear`` modules' (names, shapes, initial values), so checkpoints, the
optimizer's groups and the memory count are unchanged. Each weight is cast to the autocast dtype before the gate
and up weights are stacked (``concat_layout``: gate rows, then up rows), the cast autocast's own linear makes.
With ``train.mlp: quack`` the GEMMs take quack's default tile configuration (``tuned=False``); with
``quack-autotuned`` quack's autotuner picks each GEMM's tiles when it is first called: it compiles and times every
candidate kernel, on an H100 18 for each gated GEMM and 44 for each plain one (quack/gemm_config.py), each a CuTe
DSL compilation in a pool of QUACK_COMPILE_WORKERS processes (quack/cache/async_compile.py), and keeps the fastest
for the step's shapes. The same products either way, in other tiles. quack-kernels 0.6.5
(requirements/gpu-kernels.txt) on CUDA GPUs; :mod:`llmpar.kernels` refuses a study that cannot have it.
"""

from __future__ import annotations

import torch

from llmpar.autocast import compute_dtype

ACTIVATION = "swiglu"  # quack's name for silu(gate) * up, LlamaMLP's act_fn (hidden_act silu) on the gate

_CLASSES: dict = {}


def mlp_function():
    """quack's gated MLP (imported on first use: importing quack needs a CUDA host's CUTLASS DSL)."""
    from quack.mlp import mlp_func

    return mlp_func


def quack_mlp_class(autotuned: bool = False):
    """A subclass of the installed transformers' LlamaMLP whose forward is quack's gated MLP, on quack's default
    tiles or its autotuned ones (built once each)."""
    if autotuned in _CLASSES:
        return _CLASSES[autotuned]
    from transformers.models.llama import modeling_llama as llama

    class QuackLlamaMLP(llama.LlamaMLP):
        def forward(self, x):
            dtype = compute_dtype(x, x.dtype)
            stacked = torch.cat([self.gate_proj.weight.to(dtype), self.up_proj.weight.to(dtype)])
            return mlp_function()(x.to(dtype), stacked, self.down_proj.weight.to(dtype), activation=ACTIVATION,
                                  concat_layout=True, tuned=autotuned)

    _CLASSES[autotuned] = QuackLlamaMLP
    return QuackLlamaMLP


def use_quack_mlp(model, autotuned: bool = False) -> None:
    """Give every decoder layer's MLP quack's gated GEMMs (``train.mlp: quack``, or ``quack-autotuned``)."""
    if model.config.hidden_act != "silu" or model.config.mlp_bias:
        raise ValueError("train.mlp quack computes SwiGLU without biases; this model's MLP has activation "
                         f"{model.config.hidden_act}, mlp_bias {model.config.mlp_bias}")
    cls = quack_mlp_class(autotuned)
    for layer in model.model.layers:
        if type(layer.mlp).__name__ != "LlamaMLP":
            raise TypeError(f"train.mlp quack replaces LlamaMLP; this layer's MLP is a {type(layer.mlp).__name__}")
        layer.mlp.__class__ = cls
