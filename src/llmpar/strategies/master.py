"""``precision: bf16-master``: the model's weights in bf16, the optimizer's in fp32.

Under ``bf16`` autocast every projection casts its fp32 weight to bf16 in each micro-batch's forward, and its
bf16 weight gradient back to fp32 in the backward before autograd adds it to the fp32 ``.grad``: three passes over
every weight per micro-batch. Here the model holds bf16 weights, which autocast's projections take as they are,
and :class:`MasterWeights` holds the fp32 master copies the optimizer steps, as Megatron-LM's bf16 training does
(fp32 main parameters and gradients beside the bf16 model). Each micro-batch's bf16 gradient is taken from the
model as soon as autograd has accumulated it (a post-accumulate hook) and held, and the step sums the micro-batches'
gradients in fp32, so the sum over micro-batches is fp32 as in ``bf16``; after the step the masters are rounded into
the model's weights.

The step (:meth:`MasterWeights.step`) is that sum, ``clip_grad_norm_``'s clipping, torch's AdamW
(``torch.optim.adamw.adamw``, its multi-tensor form) on the masters and the rounding, on CUDA as one compiled
function: inductor may then fuse the sum, the clipping coefficient, the update and the bf16 copy into the kernels
that read the gradients, where the eager sequence writes the fp32 sums, scales them in place for the clipping and
reads the masters again to copy them. The state is the fused AdamW optimizer's (the same keys, a device step
counter), so checkpoints and the state bytes are unchanged; the arithmetic is AdamW's, in another order than the
fused kernel's.

The bf16 weight gradients are the ones ``bf16`` autocast computes too (bf16 GEMM outputs), the projections see
the same bf16-rounded weights, and the residual stream is bf16 as in ``bf16-residual`` (the embedding's weight is
bf16). What differs from ``bf16-residual``: each RMSNorm multiplies by its weight rounded to bf16, and the
rotary embedding's buffers stay fp32 (only parameters are cast).
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw

from llmpar.strategies.optim import clip_coefficient


class MasterWeights:
    """fp32 masters of ``model``'s trainable parameters (taken before the model is cast, so they start at the
    fp32 initial values), the model's parameters cast to bf16 in place (the same ``Parameter`` objects, so
    compiled layers, hooks and names are unchanged), and the hooks that take each micro-batch's bf16 gradient.

    The first two micro-batches' gradients are held in bf16 (:attr:`held`), and the step forms their fp32 sum as it
    reads them (:func:`clip_adamw_round`), so no fp32 gradient is written: on CUDA the sum is part of the compiled
    step, and nothing compiled runs in the backward's hooks (which run on autograd's device thread). A third
    micro-batch's gradient turns the pair into the fp32 ``.grad`` of the master (cast, add, add), to which later ones
    are added, so at most two bf16 gradients are held a parameter.
    """

    def __init__(self, model: torch.nn.Module):
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        self.masters = [p.detach().clone().float() for p in self.params]
        self.held: list[list[torch.Tensor]] = [[] for _ in self.params]
        self.compiled: bool | None = None  # whether the step is compiled (None: on CUDA, decided at the first step)
        self._lr: torch.Tensor | None = None
        for i, (p, master) in enumerate(zip(self.params, self.masters)):
            p.data = p.data.to(torch.bfloat16)
            p.register_post_accumulate_grad_hook(self._take(self.held[i], master))

    @staticmethod
    def _take(held: list, master: torch.Tensor):
        def hook(p: torch.Tensor) -> None:
            grad, p.grad = p.grad, None
            if master.grad is not None:
                master.grad.add_(grad)
            elif len(held) < 2:
                held.append(grad)
            else:
                master.grad = held.pop(0).float().add_(held.pop(0)).add_(grad)

        return hook

    def gradient_parts(self) -> list[list[torch.Tensor]]:
        """The step's gradients as the lists whose fp32 sum they are: the held bf16 gradients of every parameter,
        first micro-batch's list first (one or two lists), or the masters' fp32 ``.grad`` (one list). Raises
        where parameters differ in what they hold (a micro-batch that left a parameter without a gradient)."""
        kinds = {(len(h), m.grad is not None) for h, m in zip(self.held, self.masters)}
        if len(kinds) != 1 or kinds == {(0, False)}:
            missing = [n for n, h, m in zip(self.names, self.held, self.masters) if not h and m.grad is None]
            raise RuntimeError(f"bf16-master: the parameters hold gradients of different micro-batch counts "
                               f"{sorted(kinds)} (none for {missing[:3]}): a micro-batch left some without one")
        if self.masters[0].grad is not None:
            return [[m.grad for m in self.masters]]
        return [list(part) for part in zip(*self.held)]

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor | None:
        """Sum the micro-batches' gradients in fp32, clip them to ``max_norm`` (0: no clipping), step AdamW on the
        masters and round them into the model (:func:`clip_adamw_round`); returns the gradients' norm before
        clipping (None without clipping). ``optimizer``: the AdamW the engine made, whose hyperparameters, learning
        rate (as its scheduler sets it) and state this step uses and keeps."""
        parts = self.gradient_parts()
        (group,) = optimizer.param_groups
        if group["params"] != list(self.masters):
            raise ValueError("bf16-master steps an optimizer of its masters, in their order")
        states = []
        for m in self.masters:
            state = optimizer.state[m]
            if not state:  # the fused AdamW's state: a device step counter and fp32 moments
                state.update(step=torch.zeros((), dtype=torch.float32, device=m.device),
                             exp_avg=torch.zeros_like(m), exp_avg_sq=torch.zeros_like(m))
            states.append(state)
        if self.compiled is None:
            self.compiled = self.masters[0].device.type == "cuda"
        lr = group["lr"]
        if self.compiled:  # the learning rate as a device tensor, which the compiled step's guards do not specialise on
            if self._lr is None:
                self._lr = torch.zeros((), device=self.masters[0].device)
            lr = self._lr.fill_(group["lr"])
        beta1, beta2 = group["betas"]
        norm = step_function(self.compiled)(
            list(self.params), self.masters, parts, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], lr=lr, max_norm=max_norm, beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], capturable=self.compiled)
        for held, m in zip(self.held, self.masters):
            held.clear()
            m.grad = None
        return norm

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


def clip_adamw_round(params, masters, parts, exp_avgs, exp_avg_sqs, steps, *, lr, max_norm, beta1, beta2, eps,
                     weight_decay, capturable):
    """The gradients, each the fp32 sum of its ``parts`` (lists of one tensor a master: the micro-batches' bf16
    gradients, or fp32 sums), ``clip_grad_norm_``'s coefficient (``max_norm`` over the gradients' 2-norm + 10⁻⁶, at
    most 1) applied to them, torch's multi-tensor AdamW on the masters, and the masters rounded into the bf16
    ``params``. Returns the norm before clipping (None where ``max_norm`` is 0). Eager, each sum and clipped
    gradient is written; compiled, inductor may compute them in the kernels that read them."""
    grads = [part.float() for part in parts[0]]
    for more in parts[1:]:
        grads = [g + part.float() for g, part in zip(grads, more)]
    norm = None
    if max_norm > 0:
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        grads = torch._foreach_mul(grads, clip_coefficient(norm, max_norm))
    adamw(masters, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=True, capturable=capturable, amsgrad=False,
          beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
    torch._foreach_copy_(params, masters)
    return norm


_COMPILED_STEP = None


def step_function(compiled: bool):
    """:func:`clip_adamw_round`, compiled (once: the learning rate and step counters are tensors, which its guards
    do not specialise on; the multi-tensor AdamW's capturable form, which keeps them on the device) or eager."""
    global _COMPILED_STEP
    if not compiled:
        return clip_adamw_round
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(clip_adamw_round)
    return _COMPILED_STEP
