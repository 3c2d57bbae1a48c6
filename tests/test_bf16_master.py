"""``precision: bf16-master``: bf16 weights in the model, fp32 masters, gradient sums and AdamW states in the
optimizer (llmpar.strategies.master), checked on CPU under bf16 autocast against ``bf16-residual``, which trains the
same projections on the same bf16-rounded weights with fp32 weights."""

import pytest
import torch
from conftest import lever_engine, make_config, token_batches

from llmpar.config import prepare
from llmpar.errors import ConfigError
from llmpar.strategies.loss import causal_lm_loss

MODEL = {"size": "tiny", "seq_len": 64}
VOCAB = 512


def engine(precision: str):
    return lever_engine(MODEL, VOCAB, precision=precision)


def batches(n: int) -> list:
    return token_batches(n, VOCAB, MODEL["seq_len"])


def test_the_model_holds_bf16_and_the_optimizer_fp32_masters_of_the_initial_weights():
    plain, master = engine("bf16-residual"), engine("bf16-master")
    initial = dict(plain.model.named_parameters())
    assert {p.dtype for p in master.model.parameters()} == {torch.bfloat16}
    assert all(m.dtype == torch.float32 and torch.equal(m, initial[n]) for n, m in master.named_weights(master.model))
    stepped = {id(p) for group in master.optimizer.param_groups for p in group["params"]}
    assert stepped == {id(m) for m in master.masters.masters}


def test_micro_batch_gradients_are_held_in_bf16_and_the_step_rounds_the_masters_into_the_model():
    """Two micro-batches' bf16 gradients are held as autograd made them (2 bytes a parameter after the first, 4
    after the second); the model keeps no gradient of its own and the masters none yet; the step takes them all
    and leaves each bf16 weight its master rounded."""
    e = engine("bf16-master")
    n = sum(q.numel() for q in e.model.parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    i = e.masters.names.index(name)
    p, master = e.masters.params[i], e.masters.masters[i]
    seen = []
    p.register_hook(lambda g: seen.append(g.clone()))
    (x1, y1), (x2, y2) = batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        causal_lm_loss(e.model, x1, y1).backward()
        assert e.model_state_bytes()["grads"] == 2 * n
        causal_lm_loss(e.model, x2, y2).backward()
    assert e.model_state_bytes()["grads"] == 4 * n
    assert [g.dtype for g in e.masters.held[i]] == [torch.bfloat16] * 2
    assert all(torch.equal(a, b) for a, b in zip(e.masters.held[i], seen))
    assert master.grad is None and all(q.grad is None for q in e.model.parameters())
    e.step_optimizer()
    assert all(not h for h in e.masters.held) and master.grad is None
    assert torch.equal(p, master.to(torch.bfloat16)) and not torch.equal(master, master.to(torch.bfloat16).float())


def test_the_step_sums_the_held_gradients_in_fp32():
    """A step from two lists of bf16 gradients is the step from their fp32 sums, bit for bit (1 + 2⁻⁹, which bf16
    rounds to 1, among them); a third micro-batch's gradient forms the fp32 sum in the hook, adding in order."""
    from llmpar.strategies.master import clip_adamw_round

    g = torch.Generator().manual_seed(3)
    a, b = [torch.randn(s, generator=g).to(torch.bfloat16) for s in SHAPES], [
        torch.randn(s, generator=g).to(torch.bfloat16) for s in SHAPES]
    a[0][0, 0], b[0][0, 0] = 1.0, 2.0 ** -9
    results = []
    for parts in ([a, b], [[x.float().add_(y) for x, y in zip(a, b)]]):
        masters = [torch.ones(s) for s in SHAPES]
        bf16 = [m.to(torch.bfloat16) for m in masters]
        moments = [[torch.zeros(s) for s in SHAPES] for _ in range(2)]
        norm = clip_adamw_round(bf16, masters, parts, *moments, [torch.zeros(()) for _ in SHAPES], lr=1e-3,
                                max_norm=1.0, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, capturable=False)
        results.append((norm, masters, moments[1]))
    (n1, m1, v1), (n2, m2, v2) = results
    assert torch.equal(n1, n2) and all(torch.equal(x, y) for x, y in zip(m1 + v1, m2 + v2))
    assert v1[0][0, 0] > 0 and float(a[0][0, 0].float() + b[0][0, 0].float()) == 1 + 2 ** -9

    e = engine("bf16-master")
    p, master = e.masters.params[3], e.masters.masters[3]
    seen = []
    p.register_hook(lambda grad: seen.append(grad.clone()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x, y in batches(2)[0] + batches(2)[1][:1]:
            causal_lm_loss(e.model, x, y).backward()
    assert not e.masters.held[3] and torch.equal(master.grad, seen[0].float().add_(seen[1]).add_(seen[2]))
    assert len(e.masters.gradient_parts()) == 1


def test_parameters_left_without_a_micro_batch_gradient_stop_the_step():
    e = engine("bf16-master")
    (x, y), _ = batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        causal_lm_loss(e.model, x, y).backward()
    e.masters.held[0].clear()  # as if the micro-batch had not reached the first parameter
    with pytest.raises(RuntimeError, match="gradients of different micro-batch counts"):
        e.step_optimizer()


SHAPES = [(64, 32), (32,), (128, 64), (7,)]
LRS = (1e-3, 2e-3, 3e-3)


def _masters_and_grads():
    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) * (10.0 if k == 1 else 0.001) for s in SHAPES] for k in range(len(LRS))]
    # the second step's gradients far above the clipping norm (norm ~1,000), the others below it (~0.1)
    return masters, grads


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_the_step_is_clipping_then_adamw_then_the_rounding(max_norm):
    """Three steps of clip_adamw_round against the sequence it replaces: clip_grad_norm_, the fused AdamW kernel,
    the copy into the bf16 weights: the masters within AdamW's rounding (another order of the same arithmetic),
    the bf16 weights, the moments and the norms before clipping the same."""
    from llmpar.strategies.master import clip_adamw_round

    start, grads = _masters_and_grads()
    ref = [m.clone() for m in start]
    ref_bf16 = [m.to(torch.bfloat16) for m in ref]
    opt = torch.optim.AdamW(ref, lr=LRS[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    ours = [m.clone() for m in start]
    ours_bf16 = [m.to(torch.bfloat16) for m in ours]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(m) for m in ours], [torch.zeros_like(m) for m in ours]
    steps = [torch.zeros(()) for _ in ours]
    for lr, step_grads in zip(LRS, grads):
        for m, g in zip(ref, step_grads):
            m.grad = g.clone()
        opt.param_groups[0]["lr"] = lr
        want = torch.nn.utils.clip_grad_norm_(ref, max_norm) if max_norm else None
        opt.step()
        torch._foreach_copy_(ref_bf16, ref)
        got = clip_adamw_round(ours_bf16, ours, [[g.clone() for g in step_grads]], exp_avgs, exp_avg_sqs, steps, lr=lr,
                               max_norm=max_norm, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, capturable=False)
        assert (got is None and want is None) or torch.equal(got, want)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(ours_bf16, ref_bf16))
    state = [opt.state[m] for m in ref]
    for a, s in zip(exp_avg_sqs, state):
        torch.testing.assert_close(a, s["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    assert [float(s) for s in steps] == [float(s["step"]) for s in state] == [len(LRS)] * len(SHAPES)


def test_the_compiled_step_trains_as_the_eager_one():
    """The step as CUDA runs it (compiled, the learning rate and step counters device tensors; here compiled for
    CPU) against the eager step in the engine: after one step the masters within AdamW's rounding; over three the
    losses within 2 x 10⁻⁵ (masters a few ulps apart round to other bf16 weights, and Adam turns the changed
    near-zero gradients into whole updates), each step at the scheduler's learning rate; each bf16 weight its master
    rounded; the optimizer's state in the fused AdamW's form."""
    eager, compiled = engine("bf16-master"), engine("bf16-master")
    compiled.masters.compiled = True
    for i, batch in enumerate(batches(3)):
        lr = compiled.optimizer.param_groups[0]["lr"]  # the scheduler's, which each step sets anew
        a, b = eager.train_step(batch), compiled.train_step(batch)
        assert abs(a - b) <= 2e-5 * abs(a), (a, b)
        assert float(compiled.masters._lr) == pytest.approx(lr, rel=1e-7)
        if i == 0:
            for x, y in zip(compiled.masters.masters, eager.masters.masters):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(compiled.masters.params, compiled.masters.masters))
    assert compiled.optimizer.state_dict()["state"][0].keys() == eager.optimizer.state_dict()["state"][0].keys()


def test_bf16_master_trains_as_bf16_residual():
    """Over 6 steps: losses within 10⁻⁴ of bf16-residual's, and the weights' change within 5 % of its change (the
    RMSNorm weights rounded to bf16 differ; bf16 autocast's fp32 stream is 3.7 % away, masters the step leaves
    alone 100 %)."""
    plain, master = engine("bf16-residual"), engine("bf16-master")
    start = {n: p.detach().clone() for n, p in plain.model.named_parameters()}
    for batch in batches(6):
        a, b = plain.train_step(batch), master.train_step(batch)
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)
    ref, got = dict(plain.named_weights(plain.model)), dict(master.named_weights(master.model))
    change = sum((ref[n] - start[n]).square().sum() for n in start).sqrt()
    apart = sum((got[n] - ref[n]).square().sum() for n in start).sqrt()
    assert apart <= 0.05 * change, (float(apart), float(change))


def test_a_resumed_bf16_master_run_continues_exactly(tmp_path):
    """Masters and AdamW states come back from the checkpoint: two steps, save, load into a fresh engine, two
    more steps give the uninterrupted run's losses bit for bit."""
    data = batches(4)
    straight = engine("bf16-master")
    losses = [straight.train_step(b) for b in data]
    first = engine("bf16-master")
    for b in data[:2]:
        first.train_step(b)
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = engine("bf16-master")
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert [resumed.train_step(b) for b in data[2:]] == losses[2:]
    assert all(torch.equal(p, q) for p, q in zip(resumed.model.parameters(), straight.model.parameters()))


def test_model_state_bytes_count_weights_masters_and_fp32_sums():
    e = engine("bf16-master")
    n = sum(p.numel() for p in e.model.parameters())
    first, second = batches(2)
    e.train_step(first)  # AdamW's states exist from the first step on
    e.arm_state_capture()
    e.train_step(second)
    assert e.captured_state_bytes == {"params": 6 * n, "grads": 4 * n, "optimizer": 8 * n}


@pytest.mark.parametrize("run", [
    {"strategy": "data_parallel", "gpus_per_node": 2},
    {"strategy": "fsdp", "gpus_per_node": 2},
    {"strategy": "zero", "zero_stage": 1, "gpus_per_node": 2},
])
def test_bf16_master_is_refused_outside_single(run):
    with pytest.raises(ConfigError, match="precision bf16-master .* implemented for strategy single"):
        prepare(make_config({"r": {**run, "precision": "bf16-master"}}))
