"""What a run observably executed, recorded in its summary so that tests check behaviour, not the config.

Not metrics (the report shows none of them): facts about one training step that a silently skipped
lever would change.

* :class:`LayerProbe` watches the model's decoder layers during one training step (the second step
  of each attempt: the first may hold one-time work such as a pipeline stage's shape inference), with
  module hooks that work under every engine (the layers are the model's own modules, whatever wraps
  or moves them):

  - ``forwards``: decoder-layer forward calls on this rank in that step, over all its layers.
    Gradient accumulation multiplies them by the micro-batches; activation checkpointing adds one
    recomputation per checkpointed layer call.
  - ``layer``, ``passes``: the first layer that ran on this rank (a pipeline stage's first layer) and
    the order of its passes: ``F`` a forward, ``R`` a forward recomputed inside backward (activation
    checkpointing), ``B`` the gradient reaching its output (its backward starts). A pipeline
    schedule shows here: GPipe runs every micro-batch's forward before any backward, 1F1B alternates.
  - ``input_dtype``: the dtype of the hidden states entering that layer (its first forward): the
    residual stream's precision. bf16 autocast keeps it fp32 in every engine (FSDP2 included, whose
    usual policy would cast it to bf16); ``bf16-residual`` and ``bf16-pure`` carry it in bf16.
  - ``params_at_backward``: elements of that layer's parameters this rank holds when the step's
    first backward reaches a decoder layer, i.e. between forward and backward: FSDP with
    ``reshard_after_forward`` is back to its shard, without it the whole layer stays gathered.

  Compiled runs are not probed: hooks added to a compiled layer make dynamo trace it again.
* :func:`compiled_graphs`: graphs torch.compile has produced in this process (dynamo's counter); the
  loop reports the difference over the run.
"""

from __future__ import annotations

import contextlib

import torch


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _local_numel(p: torch.Tensor) -> int:
    return (p.to_local() if hasattr(p, "to_local") else p).numel()


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (where checkpointing recomputes)."""
    return torch._C._current_graph_task_id() != -1


class LayerProbe:
    def __init__(self, layers):
        self.layers = list(layers)  # the modules themselves, taken before any engine wraps them
        self.forwards = 0
        self.passes: dict[int, list[str]] = {}
        self.params_at_backward: int | None = None
        self.input_dtype: dict[int, str] = {}

    @contextlib.contextmanager
    def watch(self):
        """Record the layers' passes while the block runs (one training step)."""
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._before_forward(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(self._after_forward(i)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _before_forward(self, index: int):
        # a pre-hook: a recomputation may stop as soon as it has what backward needs, before the
        # layer's post-forward hooks
        def hook(_module, args, kwargs):
            self.forwards += 1
            self.passes.setdefault(index, []).append("R" if _in_backward() else "F")
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                self.input_dtype.setdefault(index, str(hidden.dtype).removeprefix("torch."))

        return hook

    def _after_forward(self, index: int):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not _in_backward() and isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda grad: self._backward_reached(index))

        return hook

    def _backward_reached(self, index: int) -> None:
        self.passes[index].append("B")
        if self.params_at_backward is None:
            self.params_at_backward = sum(_local_numel(p) for p in self.layers[min(self.passes)].parameters())

    def result(self) -> dict | None:
        if not self.passes:
            return None
        first = min(self.passes)
        return {"forwards": self.forwards, "layer": first, "passes": "".join(self.passes[first]),
                "params_at_backward": self.params_at_backward, "input_dtype": self.input_dtype.get(first)}
