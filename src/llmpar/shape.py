"""The model's shape and its arithmetic: sizes, parameter counts, FLOPs per token, the pipeline cut.

Pure Python (no torch): the config checks, the plan and the report use it without building a model.
Nothing here knows about parallelism beyond splitting a list of layer weights into contiguous parts.
"""

from __future__ import annotations

import dataclasses

from llmpar.errors import ConfigError

MODEL_SIZES: dict[str, dict[str, int]] = {
    # ~0.25M parameters with a 512 vocabulary: the CPU test model.
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=176),
    "125M": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048),
    "350M": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816),
    # TinyLlama-1.1B shape: hidden 2048, 22 layers, GQA 32/4, SwiGLU 5632.
    "1B": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632),
}


def model_dims(model_cfg: dict) -> dict[str, int]:
    """The size preset with any explicit dimension in the config taking precedence."""
    dims = dict(MODEL_SIZES[model_cfg.get("size", "tiny")])
    for key in dims:
        if model_cfg.get(key) is not None:
            dims[key] = model_cfg[key]
    if dims["hidden_size"] % dims["num_heads"]:
        raise ConfigError(
            f"model: hidden_size {dims['hidden_size']} is not divisible by num_heads {dims['num_heads']}"
        )
    if dims["num_heads"] % dims["num_kv_heads"]:
        raise ConfigError(
            f"model: num_heads {dims['num_heads']} is not divisible by num_kv_heads {dims['num_kv_heads']}"
        )
    return dims


def model_vocab(model_cfg: dict, tokenizer_vocab: int) -> int:
    """Embedding rows: model.vocab_size when set (it must cover the tokenizer), else the tokenizer's."""
    want = model_cfg.get("vocab_size")
    if want is None:
        return tokenizer_vocab
    if want < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size {want} is smaller than the tokenizer's vocabulary {tokenizer_vocab}")
    return want


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder's dimensions: hidden ``h``, MLP width ``f``, KV width ``kv`` (KV heads x head size)."""

    h: int
    f: int
    kv: int
    heads: int
    layers: int
    vocab: int
    seq: int

    @property
    def layer_matmul(self) -> int:  # q, k, v, o and the three MLP projections
        return 2 * self.h * self.h + 2 * self.h * self.kv + 3 * self.h * self.f

    @property
    def layer_params(self) -> int:  # the projections and the two RMSNorm weights
        return self.layer_matmul + 2 * self.h


def shape_of(model_cfg: dict, vocab_size: int) -> Shape:
    d = model_dims(model_cfg)
    return Shape(h=d["hidden_size"], f=d["intermediate_size"], heads=d["num_heads"],
                 kv=d["num_kv_heads"] * d["hidden_size"] // d["num_heads"], layers=d["num_layers"],
                 vocab=model_vocab(model_cfg, vocab_size), seq=model_cfg["seq_len"])


def param_counts(model_cfg: dict, vocab_size: int) -> dict[str, int]:
    """Parameter counts from the shape alone (no model built): total, embedding, non-embedding."""
    sh = shape_of(model_cfg, vocab_size)
    embedding = head = sh.vocab * sh.h
    total = embedding + sh.layers * sh.layer_params + sh.h + head
    return {
        "total": total,
        "embedding": embedding,
        # The output projection is real compute, so only the input embedding (a lookup) is excluded.
        "non_embedding": total - embedding,
        "per_layer": sh.layer_params,
    }


def flops_per_token(model_cfg: dict, vocab_size: int) -> float:
    """Training FLOPs per token: 6·N + 6·L·h·s.

    N is the non-embedding parameter count (the input embedding is a lookup; the output projection
    counts). 6·N covers forward (2N) and backward (4N) matmuls. 6·L·h·s is the attention
    score/value work for causal attention (half of PaLM's 12·L·h·s, since the causal mask skips
    half the matrix). Recomputation from activation checkpointing is NOT counted: MFU measures useful
    model FLOPs, so checkpointing lowers MFU.
    """
    sh = shape_of(model_cfg, vocab_size)
    n = param_counts(model_cfg, vocab_size)["non_embedding"]
    return 6.0 * n + 6.0 * sh.layers * sh.h * sh.seq


def balanced_split(weights: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous split of ``weights`` into ``parts`` non-empty ranges minimising the largest sum.

    Returns [start, end) index ranges. Exact dynamic programme, O(parts * n^2) (n = layers <= ~100).
    """
    n = len(weights)
    if parts > n:
        raise ConfigError(f"{n} layers cannot fill {parts} pipeline chunks")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[k][i]: smallest max-chunk sum splitting the first i items into k chunks; cut[k][i]: last cut
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def pipeline_layer_weights(sh: Shape, balance: str = "parameters") -> list[int]:
    """The weight of each decoder layer when a pipeline cuts the model (``pipeline_balance``); the torch
    engine cuts by it too (``pp_torch.chunk_layer_ranges``): by ``parameters``, its own plus the embedding on the
    first layer and the final norm and output head on the last; by ``flops``, its training FLOPs per token
    (6 x its matmul parameters + 6·h·s of causal attention, as :func:`flops_per_token` counts them) plus the
    output head's (6·V·h) on the last, the embedding (a lookup) counting nothing."""
    if balance == "flops":
        weights = [6 * sh.layer_matmul + 6 * sh.h * sh.seq] * sh.layers
        weights[-1] += 6 * sh.vocab * sh.h
        return weights
    weights = [sh.layer_params] * sh.layers
    weights[0] += sh.vocab * sh.h
    weights[-1] += sh.vocab * sh.h + sh.h
    return weights
