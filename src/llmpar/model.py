"""The model: a plain `transformers` Llama built from a LlamaConfig (no download).

Nothing here knows about parallelism; strategies take the built model and shard or wrap it. The
model's arithmetic (parameter counts, FLOPs per token) is :mod:`llmpar.shape`'s, which needs no torch.
"""

from __future__ import annotations

from llmpar.shape import Shape, model_dims, model_vocab


def llama_config(model_cfg: dict, vocab_size: int):
    from transformers import LlamaConfig

    d = model_dims(model_cfg)
    vocab_size = model_vocab(model_cfg, vocab_size)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_layers"],
        num_attention_heads=d["num_heads"],
        num_key_value_heads=d["num_kv_heads"],
        max_position_embeddings=model_cfg["seq_len"],
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def model_shape(config) -> Shape:
    """The :class:`~llmpar.shape.Shape` of a built model, from its ``LlamaConfig`` (the inverse of
    :func:`llama_config`)."""
    return Shape(h=config.hidden_size, f=config.intermediate_size, heads=config.num_attention_heads,
                 kv=config.num_key_value_heads * config.hidden_size // config.num_attention_heads,
                 layers=config.num_hidden_layers, vocab=config.vocab_size, seq=config.max_position_embeddings)


# train.attention -> the transformers attention implementation the model is built with; every other value is
# SDPA, with the backend order of :func:`attention_backends`
ATTENTION_IMPLEMENTATIONS = {"fa4": "flash_attention_4", "fa4-op": "llmpar_fa4"}


def build_model(model_cfg: dict, vocab_size: int, seed: int, device="cpu", attention: str = "default"):
    """Build the Llama with weights drawn from ``seed`` on ``device``: identical on every rank. ``attention``:
    ``train.attention`` (``fa4``, ``fa4-op``: FlashAttention-4, :mod:`llmpar.kernels`)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = llama_config(model_cfg, vocab_size)
    cfg._attn_implementation = ATTENTION_IMPLEMENTATIONS.get(attention, "sdpa")
    if cfg._attn_implementation == "llmpar_fa4":
        from llmpar import fa4_op

        fa4_op.register()
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model


def fuse_projections(model, mlp: bool = True) -> None:
    """Each decoder layer's query, key and value projections as one GEMM, and, with ``mlp``, its gate and up
    projections as one (``train.fused_projections``; quack's gated MLP, ``train.mlp: quack``, computes gate and
    up as one GEMM itself and keeps its class): the layer's attention and MLP take the classes below, whose forward
    concatenates the projections' weights and splits the product. The parameters (names, shapes, initial
    values) stay those of the separate ``nn.Linear`` modules, so checkpoints, the optimizer's groups and the
    memory count are unchanged; only the GEMMs' shapes differ (the key and value projections of 4 KV heads
    are 256 columns wide, too narrow for the tensor cores' large tiles on their own). Under autocast each
    weight is cast to the autocast dtype before the concatenation (:func:`_joined`), the cast autocast's own
    linear makes, so the concatenation and its backward split move half the bytes of fp32 weights. On an H100
    the fused GEMMs' saving is spent again in the backward, which joins the activations' gradients for the
    fused GEMM (RESULTS.md, "Kernel levers"); the key stays off in the presets."""
    fused = _fused_classes()
    for layer in model.model.layers:
        layer.self_attn.__class__ = fused["attention"]
        if mlp:
            layer.mlp.__class__ = fused["mlp"]


_FUSED: dict = {}


def _fused_classes() -> dict:
    """The fused attention and MLP classes, subclasses of the installed transformers' Llama ones (built once,
    on first use, so that importing this module needs no transformers)."""
    if _FUSED:
        return _FUSED
    import torch
    import torch.nn.functional as F
    from transformers.models.llama import modeling_llama as llama

    from llmpar.autocast import compute_dtype

    def _joined(tensors):
        """The tensors concatenated on dim 0, each first cast to the autocast dtype where autocast is on for
        their device (the same rounding that autocast's linear applies to an fp32 weight)."""
        dtype = compute_dtype(tensors[0])
        if dtype is not None:
            tensors = [t.to(dtype) for t in tensors]
        return torch.cat(tensors)

    class FusedLlamaAttention(llama.LlamaAttention):
        """LlamaAttention's training forward (no KV cache) with one GEMM for q, k and v."""

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            for key in ("cache", "past_key_values"):
                if kwargs.pop(key, None) is not None:
                    raise ValueError("fused projections train without a KV cache")
            kwargs.pop("use_cache", None)
            kwargs.pop("cache_position", None)
            projections = (self.q_proj, self.k_proj, self.v_proj)
            weight = _joined([p.weight for p in projections])
            bias = None if self.q_proj.bias is None else _joined([p.bias for p in projections])
            shape = (*hidden_states.shape[:-1], -1, self.head_dim)
            q, k, v = (t.view(shape).transpose(1, 2) for t in F.linear(hidden_states, weight, bias).split(
                [p.out_features for p in projections], dim=-1))
            cos, sin = position_embeddings
            q, k = llama.apply_rotary_pos_emb(q, k, cos, sin)
            impl = self.config._attn_implementation
            attend = (llama.eager_attention_forward if impl == "eager"
                      else llama.ALL_ATTENTION_FUNCTIONS[impl])
            out, weights = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training
                                  else self.attention_dropout, scaling=self.scaling, **kwargs)
            return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights

    class FusedLlamaMLP(llama.LlamaMLP):
        """LlamaMLP with one GEMM for the gate and up projections."""

        def forward(self, x):
            weight = _joined([self.gate_proj.weight, self.up_proj.weight])
            bias = None if self.gate_proj.bias is None else _joined([self.gate_proj.bias, self.up_proj.bias])
            gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
            return self.down_proj(self.act_fn(gate) * up)

    _FUSED.update(attention=FusedLlamaAttention, mlp=FusedLlamaMLP)
    return _FUSED


def attention_backends(name: str, device_type: str):
    """Context in which SDPA on CUDA tries ``name`` first (``train.attention``): ``cudnn`` puts cuDNN's
    fused attention first (PyTorch's default order is flash, efficient, math, cuDNN: cuDNN is never
    picked). On an H200, causal attention of the 1.1B shape (B 8, s 2048, 32 query / 4 KV heads, d 64)
    forward + backward took 1.57 ms with cuDNN and 2.45 ms with flash (benchmarks/gpu_probe.py). Every
    backend stays enabled: inputs one refuses fall through to the next. ``default`` keeps PyTorch's
    order. It matters for eager runs: compiled graphs ran cuDNN's kernels under either order on the
    H200 (results/h200-1b/probe/profile.jsonl: ``python benchmarks/gpu_probe.py --no-micro --profile
    --variants cudnn16``). On CPU, and for attention that is not SDPA's (``fa4``), nothing changes."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device_type != "cuda" or name == "default" or name in ATTENTION_IMPLEMENTATIONS:
        return contextlib.nullcontext()
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name]
    default = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
               SDPBackend.CUDNN_ATTENTION]
    return sdpa_kernel([first] + [b for b in default if b != first] + [SDPBackend.OVERRIDEABLE],
                       set_priority=True)


def decoder_layer_kwargs(config, rotary_emb, hidden_states):
    """What ``LlamaModel.forward`` computes once for all decoder layers (positions, the causal mask, the
    rotary cos/sin), for a pipeline stage that runs a slice of the layers on ``hidden_states``.

    Both pipeline engines call this, so a stage computes exactly what the whole model computes.
    ``create_causal_mask`` changed its keywords within transformers 5.x: 5.24 (requirements/lock.txt) takes
    ``inputs_embeds`` and ``cache``, 5.17 ``input_embeds``, ``past_key_values`` and
    ``cache_position``. Only the names the installed version accepts are passed
    (tests/test_launch.py checks both signatures).
    """
    import torch
    from transformers.masking_utils import create_causal_mask

    pos = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
    mask = create_causal_mask(**mask_kwargs(create_causal_mask, config, hidden_states, pos))
    return {"attention_mask": mask, "position_ids": pos,
            "position_embeddings": rotary_emb(hidden_states, position_ids=pos)}


def mask_kwargs(fn, config, hidden_states, pos) -> dict:
    """The keyword arguments of ``fn`` (a ``create_causal_mask``) for a mask over the whole sequence."""
    import inspect

    names = inspect.signature(fn).parameters
    offered = {"config": config, "inputs_embeds": hidden_states, "input_embeds": hidden_states,
               "attention_mask": None, "cache": None, "past_key_values": None, "cache_position": pos[0],
               "position_ids": pos}
    required = [n for n, p in names.items() if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    missing = [n for n in required if n not in offered]
    if missing:
        raise TypeError(f"create_causal_mask of this transformers version needs {missing}, which llmpar does not "
                        "know how to fill")
    return {k: v for k, v in offered.items() if k in names}
