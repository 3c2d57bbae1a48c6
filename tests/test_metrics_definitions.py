"""Every metric definition on synthetic step records with known answers."""

import math

import pytest

from llmpar.metrics import definitions as D


def steps(n, tokens_per_step=100, step_time=0.5, start=2.0, attempt=0, first=1):
    rows, t = [], start
    for s in range(first, first + n):
        t += step_time
        rows.append({"step": s, "loss": 5.0 - 0.1 * s, "tokens": s * tokens_per_step, "samples": s * 2,
                     "step_time_s": step_time, "elapsed_s": t, "attempt": attempt})
    return rows


def test_throughput_steady_and_overall():
    rows = steps(10)
    rows[0]["step_time_s"] = rows[1]["step_time_s"] = 3.0  # slow warm-up steps are excluded from steady state
    tp = D.throughput(rows, warmup=2, seq_len=50, world_size=4)
    assert tp["tokens_per_s"] == pytest.approx(100 / 0.5)
    assert tp["samples_per_s"] == pytest.approx(200 / 50)
    assert tp["tokens_per_s_per_gpu"] == pytest.approx(50)
    assert tp["steady_steps"] == 8
    # overall: all 1000 tokens over the wall time from process start (0) to the end of the last step (7.0 s)
    assert tp["tokens_per_s_overall"] == pytest.approx(1000 / 7.0)


def test_target_reached_between_two_evaluations_takes_the_later_one():
    evals = [{"step": 10, "tokens": 1000, "elapsed_s": 5.0, "val_loss": 4.0},
             {"step": 20, "tokens": 2000, "elapsed_s": 9.0, "val_loss": 3.0},
             {"step": 30, "tokens": 3000, "elapsed_s": 13.0, "val_loss": 2.5}]
    r = D.time_to_target(evals, target=3.5)  # crossed between step 10 and 20: first validation at/below wins
    assert r["target_reached"] is True and r["tokens_to_target"] == 2000 and r["seconds_to_target"] == 9.0
    exact = D.time_to_target(evals, target=3.0)
    assert exact["tokens_to_target"] == 2000


def test_target_never_reached_is_a_value():
    evals = [{"step": 10, "tokens": 1000, "elapsed_s": 5.0, "val_loss": 4.0}]
    r = D.time_to_target(evals, target=1.0)
    assert r["target_reached"] is False and r["tokens_to_target"] is None and r["seconds_to_target"] is None
    assert D.time_to_target(evals, target=None)["target_reached"] is None


def test_val_loss_at_token_budget_interpolates():
    evals = [{"tokens": 1000, "val_loss": 4.0}, {"tokens": 2000, "val_loss": 3.0}]
    assert D.val_loss_at_tokens(evals, 1500) == pytest.approx(3.5)
    assert D.val_loss_at_tokens(evals, 2000) == pytest.approx(3.0)
    assert D.val_loss_at_tokens(evals, 2500) is None


def test_restart_that_repeats_steps():
    """Attempt 0 ran steps 1-7 and died; the checkpoint was at step 5; attempt 1 re-did 6-7 and ran to 10."""
    first = steps(7, start=0.0)
    second = steps(5, first=6, start=first[-1]["elapsed_s"] + 3.0, attempt=1)
    kept, redone = D.dedupe_steps(first + second)
    assert [r["step"] for r in kept] == list(range(1, 11)) and redone == 2
    assert all(r["attempt"] == 1 for r in kept if r["step"] > 5)
    wall = kept[-1]["elapsed_s"]
    # goodput counts applied steps only (10) over the whole wall time, including the lost work and restart
    assert D.goodput(len(kept), wall) == pytest.approx(10 / wall)
    assert D.goodput(len(kept), wall) < len(first + second) / wall


def test_mfu_counts_each_token_once_per_replica():
    fpt = 6e9
    # 8 GPUs, 80k tokens/s in total: 10k tokens/s per GPU x 6 GFLOP / 1e15 = 0.06
    assert D.mfu(80_000, 8, fpt, 1e15) == pytest.approx(0.06)
    assert D.mfu(80_000, 8, fpt, None) is None  # CPU without a configured peak: undefined
    assert D.peak_flops_for("NVIDIA H200", None) == 989e12
    assert D.peak_flops_for("NVIDIA H100 PCIe", None) == 756e12
    assert D.peak_flops_for("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert D.peak_flops_for("cpu", 1e12) == 1e12


def test_flops_per_token_formula():
    from llmpar.shape import flops_per_token, param_counts

    m = {"size": "1B", "seq_len": 2048}
    n = param_counts(m, 32000)["non_embedding"]
    assert flops_per_token(m, 32000) == 6 * n + 6 * 22 * 2048 * 2048
    assert n == param_counts(m, 32000)["total"] - 32000 * 2048


def test_utilization_over_the_steady_window():
    samples = [{"t_s": t / 10, "rank": r, "util_pct": 10.0 if t < 20 else 90.0 + r}
               for t in range(40) for r in (0, 1)]
    u = D.utilization(samples, 2.0, 3.9)
    assert u["util_mean_pct"] == pytest.approx(90.5)
    assert u["util_per_rank"][1]["median"] == pytest.approx(91.0)
    assert D.utilization([{"t_s": 1, "rank": 0, "util_pct": None}], 0, 2)["util_mean_pct"] is None


def test_bubble_fraction():
    assert D.bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert D.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert D.breakdown_shares({"forward": 1.0, "backward": 3.0}) == {"forward": 0.25, "backward": 0.75}
    assert math.isnan(D.goodput(3, 0.0))


def test_ratios_against_the_baseline_and_scaling_efficiency():
    """The ratio columns are the defining quotients; the baseline's are exactly 1; scaling efficiency
    compares per-GPU throughput with the single-process run of the same micro-batch size, or is empty."""
    import pandas as pd

    from llmpar.analysis.aggregate import add_ratios

    df = pd.DataFrame([
        dict(run="single", strategy="single", status="ok", world_size=1, micro_batch_size=16, wall_time_s=100.0,
             tokens_per_s=1000.0, tokens_per_s_per_gpu=1000.0, peak_mem_gib=60.0, final_loss=2.0),
        dict(run="single-mb8", strategy="single", status="ok", world_size=1, micro_batch_size=8, wall_time_s=110.0,
             tokens_per_s=900.0, tokens_per_s_per_gpu=900.0, peak_mem_gib=40.0, final_loss=2.002),
        dict(run="ddp", strategy="data_parallel", status="ok", world_size=2, micro_batch_size=8, wall_time_s=80.0,
             tokens_per_s=1710.0, tokens_per_s_per_gpu=855.0, peak_mem_gib=48.0, final_loss=1.99),
        dict(run="pp", strategy="pipeline_parallel", status="ok", world_size=2, micro_batch_size=4,
             wall_time_s=70.0, tokens_per_s=1500.0, tokens_per_s_per_gpu=750.0, peak_mem_gib=20.0, final_loss=2.0),
        dict(run="oom", strategy="data_parallel", status="oom", world_size=2, micro_batch_size=16, wall_time_s=5.0,
             tokens_per_s=None, tokens_per_s_per_gpu=None, peak_mem_gib=None, final_loss=None),
    ])
    r = add_ratios(df, "single").set_index("run")
    assert (r.loc["single", ["time_reduction_x", "throughput_increase_x", "memory_reduction_x",
                             "scaling_efficiency"]] == 1.0).all()
    assert r.loc["ddp", "time_reduction_x"] == 100.0 / 80.0
    assert r.loc["ddp", "throughput_increase_x"] == 1710.0 / 1000.0
    assert r.loc["ddp", "memory_reduction_x"] == 60.0 / 48.0
    assert r.loc["ddp", "scaling_efficiency"] == 855.0 / 900.0  # against single-mb8, not single
    assert r.loc["ddp", "final_loss_rel_gap"] == abs(1.99 - 2.0) / 2.0
    assert pd.isna(r.loc["pp", "scaling_efficiency"])  # no single run at micro-batch 4
    assert r.loc["oom", ["scaling_efficiency", "throughput_increase_x"]].isna().all()


def test_step_loss_gap_is_the_largest_over_the_steady_steps_of_runs_of_the_baselines_batches():
    """The largest per-step relative loss gap to the baseline and its step, over the run's steady steps only (a
    warm-up step's gap does not count); none for runs of another global batch or step count, or that failed."""
    import pandas as pd

    from llmpar.analysis.aggregate import add_step_loss_gaps

    base = [4.0, 3.0, 2.0, 1.0]
    runs = {"single": base, "ddp": [9.0, 3.03, 1.9, 1.0], "gb64": [4.0, 3.0, 2.0, 1.0], "oom": [4.0]}
    steps = pd.DataFrame([{"run": r, "step": i + 1, "loss": v} for r, losses in runs.items()
                          for i, v in enumerate(losses)])
    df = pd.DataFrame([
        dict(run="single", status="ok", global_batch=32, steps_completed=4, steady_steps=3),
        dict(run="ddp", status="ok", global_batch=32, steps_completed=4, steady_steps=3),
        dict(run="gb64", status="ok", global_batch=64, steps_completed=4, steady_steps=3),
        dict(run="oom", status="oom", global_batch=32, steps_completed=1, steady_steps=None),
    ])
    r = add_step_loss_gaps(df, steps, "single").set_index("run")
    assert r.loc["ddp", "step_loss_gap_max"] == pytest.approx(0.05) and r.loc["ddp", "step_loss_gap_step"] == 3
    assert r.loc["single", "step_loss_gap_max"] == 0.0 and r.loc["single", "step_loss_gap_step"] is None
    assert r.loc["gb64", "step_loss_gap_max"] is None and r.loc["oom", "step_loss_gap_max"] is None


def test_bubble_measured_is_the_mean_idle_share_of_the_schedule():
    ranks = [{"forward": 1.0, "backward": 2.0, "pipeline_idle": 1.0, "optimizer": 5.0, "grad_sync": 1.0},
             {"forward": 1.0, "backward": 3.0, "pipeline_idle": 0.0, "optimizer": 5.0, "grad_sync": 1.0}]
    assert D.bubble_measured(ranks) == (0.25 + 0.0) / 2  # optimizer and gradient sync are outside the schedule
    assert D.bubble_measured([{"forward": 1.0, "backward": 2.0, "optimizer": 1.0}, None]) is None


# bf16 dense tensor-core peak of every card in PEAK_FLOPS, from its maker's datasheet (dense: half the
# "with sparsity" figure the datasheets also print). V100 has no bf16: its FP16 tensor-core rate.
DATASHEETS = {
    "H200": (989e12, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 1,979 TFLOPS with sparsity"),
    "H100 PCIe": (756e12, "NVIDIA H100 Tensor Core GPU datasheet, H100 PCIe: BF16 1,513 TFLOPS with sparsity"),
    "H100": (989e12, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 1,979 TFLOPS with sparsity"),
    "GH200": (989e12, "NVIDIA GH200 Grace Hopper Superchip datasheet: FP16/BF16 1,979 TFLOPS with sparsity"),
    "B200": (2250e12, "NVIDIA HGX B200 datasheet: FP16/BF16 36 PFLOPS with sparsity for 8 GPUs"),
    "A100": (312e12, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS (624 with sparsity)"),
    "A800": (312e12, "NVIDIA A800 Tensor Core GPU datasheet: BF16 312 TFLOPS (624 with sparsity)"),
    "L40S": (362e12, "NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733 with sparsity)"),
    "L4": (121e12, "NVIDIA L4 Tensor Core GPU datasheet: BF16 242 TFLOPS with sparsity"),
    "A10": (125e12, "NVIDIA A10 Tensor Core GPU datasheet: BF16 125 TFLOPS (250 with sparsity)"),
    "V100": (125e12, "NVIDIA V100 Tensor Core GPU datasheet, V100 SXM2: tensor performance 125 TFLOPS (FP16)"),
    "RTX 4090": (165e12, "NVIDIA Ada Lovelace GPU architecture whitepaper, GeForce RTX 4090: peak BF16 tensor "
                         "TFLOPS with FP32 accumulate 165.2 (330.4 with sparsity)"),
    "MI300X": (1307e12, "AMD Instinct MI300X accelerator data sheet: peak BF16 1,307.4 TFLOPS (dense)"),
    "MI250X": (383e12, "AMD Instinct MI250X accelerator data sheet: peak BF16 383 TFLOPS"),
}


def test_every_cards_peak_is_its_datasheets():
    """Each entry of PEAK_FLOPS against its datasheet (a card added to the table needs its row here), and
    the names the drivers report resolve to their own card, not to a card whose name they contain (the
    table is searched in order: H100 PCIe before H100, L40S before L4, A100 before A10)."""
    assert dict(D.PEAK_FLOPS) == {card: value for card, (value, _) in DATASHEETS.items()}
    reported = {"NVIDIA H200": "H200", "NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100 PCIe",
                "NVIDIA GH200 480GB": "GH200", "NVIDIA B200": "B200", "NVIDIA A100-SXM4-80GB": "A100",
                "NVIDIA A800 80GB PCIe": "A800", "NVIDIA L40S": "L40S", "NVIDIA L4": "L4", "NVIDIA A10": "A10",
                "Tesla V100-SXM2-32GB": "V100", "NVIDIA GeForce RTX 4090": "RTX 4090",
                "AMD Instinct MI300X": "MI300X", "AMD Instinct MI250X": "MI250X"}
    for name, card in reported.items():
        assert D.peak_flops_for(name, None) == DATASHEETS[card][0], (name, card)
    assert D.peak_flops_for("NVIDIA H100 80GB HBM3", 5e14) == 5e14  # train.peak_flops wins
    assert D.peak_flops_for("Some Unknown GPU", None) is None


def pipeline_timeline(p: int, m: int, fwd: float, bwd: float, schedule: str) -> list[list[tuple[str, float, float]]]:
    """Each rank's stage calls (phase, start, end) in an ideal pipeline with free transfers: every forward
    takes ``fwd``, every backward ``bwd``; a forward waits for the previous stage's, a backward for the next
    stage's and for its own forward. GPipe runs all forwards first; 1F1B runs p-1-r warm-up forwards on
    rank r, then alternates, then drains its backwards."""
    orders = []
    for r in range(p):
        if schedule == "gpipe":
            order = [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        else:
            warm = min(m, p - 1 - r)
            order = [("F", i) for i in range(warm)]
            for i in range(m - warm):
                order += [("F", warm + i), ("B", i)]
            order += [("B", i) for i in range(m - warm, m)]
        orders.append(order)
    done: dict[tuple[str, int, int], float] = {}
    free, pos = [0.0] * p, [0] * p
    timeline: list[list[tuple[str, float, float]]] = [[] for _ in range(p)]
    while any(pos[r] < len(orders[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            if pos[r] == len(orders[r]):
                continue
            kind, i = orders[r][pos[r]]
            needs = [("F", r - 1, i)] if kind == "F" and r > 0 else []
            if kind == "B":
                needs = [("F", r, i)] + ([("B", r + 1, i)] if r < p - 1 else [])
            if all(n in done for n in needs):
                start = max([free[r]] + [done[n] for n in needs])
                end = start + (fwd if kind == "F" else bwd)
                done[(kind, r, i)] = free[r] = end
                timeline[r].append(("forward" if kind == "F" else "backward", start, end))
                pos[r] += 1
                progressed = True
        assert progressed, "the schedule deadlocks"
    return timeline


class FakeClock:
    """A clock the test sets: PhaseTimer's readings on a synthetic timeline."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 4), (4, 8)])
def test_measured_bubble_of_a_schedule_with_a_known_idle_share(schedule, p, m):
    """The torch pipeline's breakdown (PipelineEngine.time_breakdown over its PhaseTimer) fed an ideal
    schedule's timings, as the engine records them: the schedule's span, each stage call, then the
    gradient sync and optimizer outside the schedule. Rank 0 idles exactly the textbook bubble
    (p-1)/(m+p-1) of its schedule; every rank's idle share is its span less its calls; bubble_measured
    is their mean."""
    from types import SimpleNamespace

    import torch

    from llmpar.strategies.pp_torch import PipelineEngine
    from llmpar.strategies.timer import PhaseTimer

    fwd, bwd = 1.0, 2.0
    breakdowns, expected = [], []
    for calls in pipeline_timeline(p, m, fwd, bwd, schedule):
        clock = FakeClock()
        timer = PhaseTimer(torch.device("cpu"))
        timer._now = clock
        schedule_start = timer.mark()
        for phase, start, end in calls:
            clock.now = start
            timer.start()
            clock.now = end
            timer.stop(phase)
        span = calls[-1][2]
        timer.span("schedule", schedule_start)
        timer.start()
        clock.now = span + 3.0
        timer.stop("grad_sync")
        clock.now = span + 7.0
        timer.stop("optimizer")
        breakdown = PipelineEngine.time_breakdown(SimpleNamespace(timer=timer))
        assert breakdown["forward"] == m * fwd and breakdown["backward"] == m * bwd
        assert breakdown["grad_sync"] == 3.0 and breakdown["optimizer"] == 4.0
        breakdowns.append(breakdown)
        expected.append((span - m * (fwd + bwd)) / span)
    assert breakdowns[0]["pipeline_idle"] / (m * (fwd + bwd) + breakdowns[0]["pipeline_idle"]) == \
        pytest.approx(D.bubble_fraction(p, m), rel=1e-12)
    assert D.bubble_fraction(p, m) == (p - 1) / (m + p - 1)
    assert D.bubble_measured(breakdowns) == pytest.approx(sum(expected) / p, rel=1e-12)
