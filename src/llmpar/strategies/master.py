"""``precision: bf16-master``: the model's weights in bf16, the optimizer's in fp32.

Under ``bf16`` autocast every projection casts its fp32 weight to bf16 in each micro-batch's forward, and its
bf16 weight gradient back to fp32 in the backward before autograd adds it to the fp32 ``.grad``: three passes over
every weight per micro-batch. Here the model holds bf16 weights, which autocast's projections take as they are,
and :class:`MasterWeights` holds the fp32 master copies the optimizer steps, as Megatron-LM's bf16 training does
(fp32 main parameters and gradients beside the bf16 model). Each bf16 gradient is added to its master's fp32
gradient as soon as autograd has accumulated it (a post-accumulate hook, then the bf16 gradient is dropped), so the
sum over micro-batches is fp32 as in ``bf16``; after the step the masters are rounded into the model's weights.

The bf16 weight gradients are the ones ``bf16`` autocast computes too (bf16 GEMM outputs), the projections see
the same bf16-rounded weights, and the residual stream is bf16 as in ``bf16-residual`` (the embedding's weight is
bf16). What differs from ``bf16-residual``: each RMSNorm multiplies by its weight rounded to bf16, and the
rotary embedding's buffers stay fp32 (only parameters are cast).
"""

from __future__ import annotations

import torch


class MasterWeights:
    """fp32 masters of ``model``'s trainable parameters (taken before the model is cast, so they start at the
    fp32 initial values), the model's parameters cast to bf16 in place (the same ``Parameter`` objects, so
    compiled layers, hooks and names are unchanged), and the hooks that sum each micro-batch's bf16 gradient into
    the master's fp32 ``.grad``.

    The engine sets :attr:`last` before each micro-batch's backward. A gradient of a micro-batch that is not the
    step's last is held in bf16 until the next micro-batch's arrives, and the two are summed into the fp32 gradient
    in one pass (:func:`fp32_sum`: 8 bytes a parameter, where casting the first and adding the second moves 16);
    a later micro-batch's is added to that sum, and a step of one micro-batch casts its gradient.
    """

    def __init__(self, model: torch.nn.Module):
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.masters = [p.detach().clone().float() for p in self.params]
        self.held: list[torch.Tensor | None] = [None] * len(self.params)
        self.last = True  # whether the micro-batch whose backward runs next is the step's last
        for i, (p, master) in enumerate(zip(self.params, self.masters)):
            p.data = p.data.to(torch.bfloat16)
            p.register_post_accumulate_grad_hook(self._sum_into(i, master))

    def _sum_into(self, i: int, master: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            grad, p.grad = p.grad, None
            held, self.held[i] = self.held[i], None
            if held is not None:
                master.grad = fp32_sum(held, grad)
            elif master.grad is not None:
                master.grad.add_(grad)
            elif self.last:
                master.grad = grad.float()
            else:
                self.held[i] = grad

        return hook

    def check_summed(self) -> None:
        """Before the optimizer step: every held gradient was summed (a parameter the last micro-batch left without
        a gradient would otherwise carry its held one into the next step's sum)."""
        left = [name for name, held in zip(self.names, self.held) if held is not None]
        if left:
            raise RuntimeError(f"bf16-master: the step's last micro-batch gave no gradient for {left[:3]} "
                               f"({len(left)} parameters), whose earlier micro-batch gradients are held unsummed")

    @torch.no_grad()
    def round_into_model(self) -> None:
        """The model's bf16 weights from the masters (after each optimizer step and each checkpoint load)."""
        torch._foreach_copy_(list(self.params), self.masters)

    def named(self) -> list[tuple[str, torch.Tensor]]:
        """The masters under their parameters' names (those of ``model.named_parameters()``)."""
        return list(zip(self.names, self.masters))

    def state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """Masters and optimizer state, keyed by parameter name (the optimizer's state by its position)."""
        return {"masters": dict(self.named()), "optimizer": optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer) -> None:
        masters = state["masters"]
        if list(masters) != list(self.names):
            raise ValueError(f"checkpoint's master weights are of parameters {list(masters)[:3]}..., this model's "
                             f"{list(self.names)[:3]}...")
        for name, master in zip(self.names, self.masters):
            master.copy_(masters[name])
        optimizer.load_state_dict(state["optimizer"])
        self.round_into_model()


_COMPILED_SUM = None


def _sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.float() + b.float()


def fp32_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` of two bf16 gradients, formed and returned in fp32: exact for the same IEEE result as
    ``a.float().add_(b)``. On CUDA one compiled kernel (inductor's, shapes dynamic, so one kernel for every
    parameter) reads both and writes the sum; eager CUDA has no kernel that adds bf16 tensors into fp32 without
    rounding the sum to bf16 first (``torch.add(a, b, out=fp32)`` computes in the inputs' dtype). Elsewhere the
    eager cast and add."""
    global _COMPILED_SUM
    if a.device.type != "cuda":
        return a.float().add_(b)
    if _COMPILED_SUM is None:
        _COMPILED_SUM = torch.compile(_sum, dynamic=True)
    return _COMPILED_SUM(a.view(-1), b.view(-1)).view(a.shape)
