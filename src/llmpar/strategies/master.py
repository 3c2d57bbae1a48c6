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
    the master's fp32 ``.grad``."""

    def __init__(self, model: torch.nn.Module):
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.masters = [p.detach().clone().float() for p in self.params]
        for p, master in zip(self.params, self.masters):
            p.data = p.data.to(torch.bfloat16)
            p.register_post_accumulate_grad_hook(self._sum_into(master))

    @staticmethod
    def _sum_into(master: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return hook

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
