"""Kernels from outside PyTorch (``train.attention: fa4``, ``train.mlp: quack``, ``train.norm: quack``), and what a
study needs before it uses them.

``fa4`` builds the model with transformers' ``flash_attention_4`` implementation, which calls FlashAttention-4
(the ``flash-attn-4`` package: CuTe DSL kernels for Hopper and Blackwell, compiled when first called, forward
and backward); ``fa4-op`` calls the same kernels as a torch custom op (:mod:`llmpar.fa4_op`), which a compiled
layer keeps in its graph. Both take bf16 or fp16 inputs only and train causal attention without a mask, as the
study's unpadded sequences need. Nothing falls back: a study that asks for it and cannot have it is refused, in the
config (:func:`fa4_config_problem`: the device, the precision, the head size) and on the host before any
process starts (:func:`fa4_host_problem`: a GPU of compute capability 9 or above, the package installed).
``train.mlp: quack`` (and ``quack-autotuned``) runs each decoder layer's MLP on quack-kernels' gated GEMMs
(:mod:`llmpar.quack_mlp`), which FA4 installs with it, and ``train.norm: quack`` its RMSNorms on quack's kernel, each
fused with the residual add before it (:mod:`llmpar.quack_norm`); both are refused likewise
(:func:`quack_config_problem`, :func:`quack_host_problem`).
Standard library only: the checks run before torch is imported.
"""

from __future__ import annotations

from llmpar.shape import model_dims

# the train.attention values that run FA4: through transformers' flash_attention_4, or as llmpar's custom op
FA4 = ("fa4", "fa4-op")
FA4_DISTRIBUTION = "flash-attn-4"
KERNELS_INSTALL = "pip install -r requirements/gpu-kernels.txt"  # flash-attn-4 and quack-kernels, which it needs
# head sizes FA4 trains on every architecture it supports (SM90 takes up to 256, SM100 up to 128), in steps
# of 16 bytes of bf16 (flash_attn/cute/interface.py, _validate_head_dims)
FA4_HEAD_DIMS = range(8, 129, 8)
FA4_MIN_CAPABILITY = 9  # its backward runs on SM90 and newer


def bf16_cuda_problem(what: str, train: dict, precisions: dict[str, str], takes: str, instead: str) -> str | None:
    """Why runs asking for the kernel ``what`` (e.g. ``attention fa4``) cannot have it in this config: it runs on
    CUDA and ``takes`` bf16 only (``precisions``: run name -> precision; ``instead``: the setting to use instead)."""
    if train["device"] == "cpu":
        return f"{what} runs on CUDA GPUs, and train.device is cpu"
    fp32 = sorted(name for name, p in precisions.items() if p == "fp32")
    if fp32:
        return f"{what} {takes}; run(s) {', '.join(fp32)} train in precision fp32 (use bf16, or {instead})"
    return None


def host_problem(what: str, min_capability: int, distribution: str, capability: tuple[int, int] | None,
                 installed: str | None) -> str | None:
    """Why this host cannot run the kernel ``what``, or None: ``capability`` of its first GPU (None: no CUDA GPU),
    the installed version of ``distribution`` (None: not installed)."""
    if capability is None:
        return f"{what} needs a CUDA GPU, and this host has none"
    if capability[0] < min_capability:
        return (f"{what} needs a GPU of compute capability {min_capability}.0 or above (Hopper, Blackwell); this "
                f"one is {capability[0]}.{capability[1]}")
    if installed is None:
        return f"{what} needs the {distribution} package, which is not installed ({KERNELS_INSTALL})"
    return None


def fa4_config_problem(model_cfg: dict, train: dict, precisions: dict[str, str]) -> str | None:
    """Why a study config cannot train with FA4 (``precisions``: run name -> precision), or None."""
    attention = train["attention"]
    problem = bf16_cuda_problem(f"attention {attention}", train, precisions, "takes bf16 inputs only",
                                "attention cudnn")
    if problem:
        return problem
    d = model_dims(model_cfg)
    head = d["hidden_size"] // d["num_heads"]
    if head not in FA4_HEAD_DIMS:
        return (f"attention {attention} trains head sizes {FA4_HEAD_DIMS.start}-{FA4_HEAD_DIMS.stop - 1} in "
                f"steps of {FA4_HEAD_DIMS.step}; this model's is {head}")
    return None


def fa4_host_problem(attention: str, capability: tuple[int, int] | None, installed: str | None) -> str | None:
    """Why this host cannot run FA4 as ``attention`` (a :data:`FA4` value), or None (:func:`host_problem`)."""
    return host_problem(f"attention {attention}", FA4_MIN_CAPABILITY, FA4_DISTRIBUTION, capability, installed)


# the train.mlp values that run quack's gated MLP: on quack's default tiles, or on the tiles its autotuner picks
QUACK_MLPS = ("quack", "quack-autotuned")
QUACK_DISTRIBUTION = "quack-kernels"
QUACK_MIN_CAPABILITY = 9  # its gated-epilogue GEMMs are written for SM90 and SM100 (quack/gemm_sm90.py, gemm_sm100.py)


def quack_config_problem(what: str, train: dict, precisions: dict[str, str]) -> str | None:
    """Why runs asking for quack's kernels as ``what`` (``mlp quack``, ``mlp quack-autotuned``, ``norm quack``;
    ``precisions``: run name -> precision) cannot train, or None."""
    key = what.split()[0]
    return bf16_cuda_problem(what, train, precisions, "runs bf16 kernels", f"{key} torch")


def quack_host_problem(what: str, capability: tuple[int, int] | None, installed: str | None) -> str | None:
    """Why this host cannot run quack's kernels as ``what`` (``mlp quack``, ``norm quack``), or None
    (:func:`host_problem`)."""
    return host_problem(what, QUACK_MIN_CAPABILITY, QUACK_DISTRIBUTION, capability, installed)
