"""Shared fixtures: a tiny tokenized corpus, helpers that train runs through the real launcher (one run, or
several sharing one launch) and the checks that compare a run with ``single``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from launches import run_batch  # the one batch launcher of the CPU tests

from llmpar.config import prepare, run_config
from llmpar.io import read_jsonl

REPO = Path(__file__).resolve().parents[1]
MUTANTS = REPO / "tests" / "mutants"  # a sitecustomize that breaks gradient averaging (see its docstring)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# The small, fast study every equivalence test trains: fp32, global batch 8, 6 steps.
BASE_CONFIG = {
    "study": "test",
    "seed": 7,
    "data": {"source": "synthetic", "synthetic": {"documents": 300, "words_per_document": 40}},
    "tokenizer": {"vocab_size": 300},
    "model": {"size": "tiny", "seq_len": 32},
    "train": {"steps": 6, "global_batch": 8, "lr": 0.003, "warmup_steps": 2, "eval_every": 3,
              "eval_batches": 1, "log_every": 2, "device": "cpu", "sample_period_s": 0.05},
    "runs": {"single": {"strategy": "single"}},
    "baseline": "single",
}


# ``make test`` runs the suite in pytest-xdist workers (``-n 2 --dist loadscope``). The tests of one work unit
# run in one worker, one after another, so that the fixtures they share are made once. A unit is a test
# module, except that these modules share one per line: SHARED_STUDY_MODULES use the shared study
# (tests/shared_study.py); LAYOUT_LAUNCH_MODULES train their runs in the session's layout launches
# (layout_fixtures); REPOSITORY_WORKFLOW_MODULES run Snakemake in the repository itself (its committed
# studies and its .snakemake directory, which one Snakemake at a time may use).
SHARED_STUDY_FIXTURES = ("shared_two", "shared_four")
SHARED_STUDY_MODULES = ("test_noise_scale.py", "test_observed.py", "test_resume.py")
LAYOUT_LAUNCH_MODULES = ("test_activation_checkpointing.py", "test_compile.py", "test_equivalence_ddp.py",
                         "test_equivalence_deepspeed.py", "test_equivalence_torch.py", "test_memory_states.py")
REPOSITORY_WORKFLOW_MODULES = ("test_report.py", "test_rerun.py", "test_slurm_resources.py")


def work_unit(nodeid: str) -> str:
    """The work unit of the test ``nodeid`` (see SHARED_STUDY_MODULES above)."""
    module = nodeid.split("::", 1)[0]
    name = Path(module).name
    if name in SHARED_STUDY_MODULES:
        return "shared-study"
    if name in REPOSITORY_WORKFLOW_MODULES:
        return "repository-workflow"
    if name in LAYOUT_LAUNCH_MODULES:
        return "layout-launches"
    return module


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` by :func:`work_unit`, the units in the order of the collection (the heaviest first:
    pytest_collection_modifyitems)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # xdist would order the units by their number of tests
    return WorkUnits(config, log)


def pytest_collection_modifyitems(items):
    """A test of the shared study must sit in a module of SHARED_STUDY_MODULES (else a parallel run trains
    the study once more for it). In a pytest-xdist worker, the units come in the order a parallel run
    should start them: the shared study (the longest), then the units with slow tests, then the rest,
    each unit's tests together and in their order."""
    for item in items:
        if any(f in item.fixturenames for f in SHARED_STUDY_FIXTURES) and item.path.name not in SHARED_STUDY_MODULES:
            raise pytest.UsageError(f"{item.nodeid} uses the shared study: add {item.path.name} to "
                                    "SHARED_STUDY_MODULES in tests/conftest.py")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    units: dict[str, list] = {}
    for item in items:
        units.setdefault(work_unit(item.nodeid), []).append(item)

    def rank(unit: str) -> int:
        return 0 if unit == "shared-study" else 1 if any(i.get_closest_marker("slow") for i in units[unit]) else 2

    items[:] = [item for unit in sorted(units, key=rank) for item in units[unit]]


def make_config(runs: dict | None = None, **sections) -> dict:
    cfg = json.loads(json.dumps(BASE_CONFIG))
    if runs:
        cfg["runs"] = {"single": {"strategy": "single"}, **runs}
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def token_batches(n: int, vocab: int, seq_len: int, seed: int = 0) -> list:
    """``n`` optimizer steps of random tokens, each 4 sequences in 2 micro-batches of (input, target) pairs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (4, seq_len + 1), generator=g)
        out.append(list(zip(x[:, :-1].chunk(2), x[:, 1:].chunk(2))))
    return out


# the optimizer and schedule of the single-process lever engines (lever_engine)
LEVER_TRAIN = dict(lr=3e-3, weight_decay=0.0, warmup_steps=1, steps=10, min_lr_ratio=0.1, grad_clip=1.0,
                   metrics=False, fused_loss=False)


def lever_engine(model: dict, vocab: int, **levers):
    """``single`` on CPU in this process (2 micro-batches of 2, seed 7) with the per-run ``levers`` of
    RunSpec (e.g. ``mlp="quack"``) applied as the training applies them (``prepare_model``)."""
    import types

    import torch

    from llmpar.layout import RunSpec
    from llmpar.model import build_model
    from llmpar.strategies.engine import TorchEngine
    from llmpar.strategies.levers import prepare_model

    spec = RunSpec(name="single", strategy="single", micro_batches=2, micro_batch_size=2, **levers)
    ctx = types.SimpleNamespace(device=torch.device("cpu"), is_main=True, rank=0, world_size=1)
    return TorchEngine(prepare_model(build_model(model, vocab, seed=7), spec), spec, ctx, LEVER_TRAIN)


def load_benchmark(name: str):
    """The module of benchmarks/<name>.py (benchmarks/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretend_host(monkeypatch, capability: tuple[int, int] | None, installed: str | None) -> None:
    """Make llmpar.preflight see a host whose first GPU has ``capability`` (None: no CUDA GPU) and where every
    kernel package is installed at version ``installed`` (None: not installed)."""
    from llmpar import preflight

    monkeypatch.setattr(preflight, "cuda_capability", lambda: capability)
    monkeypatch.setattr(preflight, "package_version", lambda name: installed)
    monkeypatch.setattr(preflight, "uses_cuda", lambda rc: capability is not None)


def assert_config_refused(cfg: dict, match: str, reason: str) -> None:
    """``llmpar.config.prepare`` refuses study config ``cfg`` with a message matching ``match`` (the config key) and
    containing ``reason``."""
    from llmpar.config import prepare
    from llmpar.errors import ConfigError

    with pytest.raises(ConfigError, match=match) as err:
        prepare(cfg)
    assert reason in str(err.value)


def assert_host_refused(monkeypatch, rc: dict, capability: tuple[int, int] | None, installed: str | None,
                        match: str, reason: str) -> None:
    """On the host :func:`pretend_host` makes, ``llmpar.preflight.check_kernels`` refuses run config ``rc`` with a
    message matching ``match`` and containing ``reason``."""
    from llmpar import preflight
    from llmpar.errors import ConfigError

    pretend_host(monkeypatch, capability, installed)
    with pytest.raises(ConfigError, match=match) as err:
        preflight.check_kernels(rc)
    assert reason in str(err.value)


@pytest.fixture(scope="session")
def tiny_tokens(tmp_path_factory) -> Path:
    """Corpus -> BPE -> token shards for BASE_CONFIG, built once per test session."""
    from llmpar.data.corpus import build_corpus
    from llmpar.data.tokenize import build_shards, build_tokenizer

    cfg = prepare(BASE_CONFIG)
    root = tmp_path_factory.mktemp("data")
    build_corpus(cfg["data"], cfg["seed"], root / "corpus")
    build_tokenizer(cfg["tokenizer"], root / "corpus" / "train.txt", root / "tokenizer.json")
    build_shards(root / "tokenizer.json", root / "corpus", root / "tokens")
    return root / "tokens"


def read_run(out: Path) -> tuple[dict | None, list[dict]]:
    """A run directory's summary (None before it is written) and step rows."""
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return summary, read_jsonl(out / "steps.jsonl")


def train_run(cfg: dict, run: str, tokens: Path, out: Path, timeout: int = 600, check: bool = True):
    """Train ``run`` of ``cfg`` through scripts/train.py; returns (summary, steps, completed process)."""
    prepared = prepare(cfg)
    rc = run_config(prepared, run)
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--run-config", json.dumps(rc),
           "--tokens", str(tokens), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{run} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return *read_run(out), proc


def train_batch(configs: dict[str, dict], tokens: Path, root: Path, sum_grads: tuple[str, ...] = (),
                timeout: int = 600) -> dict[str, tuple[dict, list[dict]]]:
    """Train the runs named by ``configs`` (run -> a config holding it; one process layout) in one launch
    (``scripts/train.py --batch``: the same workers train them one after another) into ``root/<run>``;
    returns {run: (summary, steps)}.

    ``sum_grads``: runs trained with the test-only mutation of tests/mutants (data-parallel gradients
    summed instead of averaged)."""
    train_jobs([(cfg, r, root / r) for r, cfg in configs.items()], tokens, root, "batch", sum_grads, timeout)
    return {r: read_run(root / r) for r in configs}


def train_jobs(jobs: list[tuple[dict, str, Path]], tokens: Path, workdir: Path, name: str,
               sum_grads: tuple[str, ...] = (), timeout: int = 600) -> str:
    """Train ``jobs`` (config, run, output directory; one process layout) in one launch, its files in
    ``workdir`` under ``name``; returns its log. ``sum_grads``: as for :func:`train_batch`."""
    launch_jobs = [{"run_config": run_config(prepare(cfg), r), "out": str(out)} for cfg, r, out in jobs]
    env = dict(os.environ)
    if sum_grads:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MUTANTS), env.get("PYTHONPATH")]))
        env["LLMPAR_TEST_SUM_GRADS"] = ",".join(sum_grads)
    log = run_batch(launch_jobs, tokens, workdir, name, timeout=timeout, env=env)
    for r in sum_grads:
        assert f"[{r}] test mutation" in log, f"the mutation did not reach run {r}"
    return log


# Clipping far below the gradient norm (about 2 in these steps): the clipped gradient's elements (~1e-8)
# are of the size of AdamW's eps, so the update depends on the clipping coefficient, not only on the
# gradient's direction as it does where clipping at 1.0 is active. An engine that skips clipping (or clips
# by another norm) then moves the losses by ~5e-3 relative at step 2 and ~3e-2 by step 6, where clipping at
# 1.0 against none moves them by 1e-4 to 6e-4 (the equivalence tolerance is 1e-4).
CLIPPED = {"grad_clip": 1e-5}


@pytest.fixture(scope="session")
def baselines(tiny_tokens, tmp_path_factory):
    """The single-process reference runs of BASE_CONFIG, one launch: ``single``, ``single-clipped``
    (CLIPPED) and ``single-bf16-residual`` (precision bf16-residual). {run: (summary, steps)}."""
    residual = {"strategy": "single", "precision": "bf16-residual"}
    return train_batch({"single": make_config(),
                        "single-clipped": make_config({"single-clipped": {"strategy": "single"}}, train=CLIPPED),
                        "single-bf16-residual": make_config({"single-bf16-residual": residual})},
                       tiny_tokens, tmp_path_factory.mktemp("baselines"))


@pytest.fixture(scope="session")
def baseline(baselines):
    """The single-process reference run of BASE_CONFIG (summary, steps)."""
    return baselines["single"]


@pytest.fixture(scope="session")
def clipped_baseline(baselines):
    """``single`` with CLIPPED (summary, steps)."""
    return baselines["single-clipped"]


def assert_same_steps(steps, ref_steps, rtol: float, min_steps: int = 5, grad_rtol: float | None = None):
    """Per-step training loss within ``rtol`` and gradient norm before clipping within ``grad_rtol`` (default
    ``rtol``) relative of the baseline, for at least ``min_steps`` steps. The losses alone cannot see a wrong
    gradient scale: AdamW's update hardly changes when every gradient is multiplied by a constant, and
    clipping undoes the multiplication wherever it clips."""
    assert len(steps) >= min_steps and len(ref_steps) >= min_steps, (len(steps), len(ref_steps))
    for a, b in zip(steps, ref_steps):
        assert a["step"] == b["step"]
        for key, tol in (("loss", rtol), ("grad_norm", rtol if grad_rtol is None else grad_rtol)):
            rel = abs(a[key] - b[key]) / abs(b[key])
            assert rel <= tol, f"step {a['step']}: {key} {a[key]} vs baseline {b[key]} (rel {rel:.2e} > {tol})"


def assert_counts(summary, steps, cfg: dict = BASE_CONFIG):
    """Tokens and throughput of a run against our own count from its config (``cfg``: the study it ran in)
    and its step rows: every step trains global_batch x seq_len tokens whatever the layout (all ranks
    together, each token once); tokens_per_s and samples_per_s are the steady steps' (those after
    train.warmup_steps_excluded) tokens and sequences over the sum of their step times."""
    train = prepare(cfg)["train"]
    batch, seq, warmup = train["global_batch"], cfg["model"]["seq_len"], train["warmup_steps_excluded"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert summary["steps_completed"] == len(steps)
    assert [r["tokens"] for r in steps] == [r["step"] * batch * seq for r in steps]
    assert [r["samples"] for r in steps] == [r["step"] * batch for r in steps]
    assert summary["tokens_trained"] == len(steps) * batch * seq
    steady = [r for r in steps if r["step"] > warmup]
    seconds = sum(r["step_time_s"] for r in steady)
    assert summary["steady_steps"] == len(steady) and summary["steady_time_s"] == pytest.approx(seconds, rel=1e-12)
    assert summary["tokens_per_s"] == pytest.approx(len(steady) * batch * seq / seconds, rel=1e-12)
    assert summary["samples_per_s"] == pytest.approx(len(steady) * batch / seconds, rel=1e-12)
    assert summary["tokens_per_s_per_gpu"] == pytest.approx(summary["tokens_per_s"] / summary["world_size"],
                                                            rel=1e-12)


def assert_matches_single(summary, steps, baseline, rtol: float, min_steps: int = 6, grad_rtol: float | None = None):
    """What every engine shares with ``single`` (``baseline``: its summary and steps): the per-step losses
    and the final validation loss (the engine's eval_loss) within ``rtol`` relative, the per-step gradient
    norms and the first update of the tracked parameters within ``grad_rtol`` (default ``rtol``), and the
    tokens it counts (:func:`assert_counts`: as many as single's)."""
    ref_summary, ref_steps = baseline
    assert summary["status"] == "ok", summary["message"]
    assert_counts(summary, steps)
    assert_counts(ref_summary, ref_steps)
    assert summary["tokens_trained"] == ref_summary["tokens_trained"]
    assert_same_steps(steps, ref_steps, rtol, min_steps, grad_rtol)
    assert_same_first_update(summary, ref_summary, rtol if grad_rtol is None else grad_rtol)
    val, ref_val = summary["final_val_loss"], ref_summary["final_val_loss"]
    assert abs(val - ref_val) <= rtol * abs(ref_val), f"final val_loss {val} vs baseline {ref_val}"


def run_matches_single(results: dict, name: str, baseline, rtol: float) -> dict:
    """Run ``name`` of a launch's ``{run: (summary, steps)}`` against ``single``: prints its largest gaps,
    asserts :func:`assert_matches_single`; returns its summary."""
    summary, steps = results[name]
    print(f"{name}: max rel gap to single: loss {max_rel_gap(steps, baseline[1]):.1e}, "
          f"grad_norm {max_rel_gap(steps, baseline[1], 'grad_norm'):.1e}")
    assert_matches_single(summary, steps, baseline, rtol)
    return summary


# --------------------------------------------------------------------------- runs of several modules


class Launched(dict):
    """{run: (summary, steps)} of one module's runs in one launch. ``log``: the launch's output; ``names``:
    run -> its name in the launch (``<module>.<run>``: the run names of different modules may coincide)."""

    def __init__(self, results: dict, log: str, names: dict[str, str]):
        super().__init__(results)
        self.log, self.names = log, names


class _Registered(NamedTuple):
    config: dict  # a config holding the run under its name in the launch
    name: str  # its name in the launch
    summed: bool  # trained with the mutation (sum_grads)
    again: bool  # trained once more in the second launch


_LAYOUT_RUNS: dict[str, dict[tuple[str, str], _Registered]] = {}  # layout -> {(module, run): the run}


def layout_fixtures(module: str, layouts: dict[str, dict[str, dict]], sum_grads: tuple[str, ...] = (),
                    again: tuple[str, ...] = ()) -> tuple:
    """Module fixtures with the results of a test module's runs, which train together with the runs of every
    module that calls this: one launch per process layout for the session (the fixture ``layout_launches``,
    made when a test first asks for the layout). Call at module level, with the module's ``__name__``:
    ``w2, w4 = layout_fixtures(__name__, {"w2": {run: config holding it, ...}, "w4": {...}})``; the fixture
    of a layout is named like it and gives the module's runs of that layout (:class:`Launched`).

    ``sum_grads``: runs trained with the test-only mutation of tests/mutants (data-parallel gradients
    summed instead of averaged). ``again``: runs of the first layout trained once more in their
    directories, in a second launch after the first (each resumes from its newest checkpoint); their
    results are one more fixture, ``<layout>_again``, after the others."""
    short = module.rsplit(".", 1)[-1]
    if f"{short}.py" not in LAYOUT_LAUNCH_MODULES:
        raise pytest.UsageError(f"{short}.py trains runs in the layout launches: add it to LAYOUT_LAUNCH_MODULES "
                                "in tests/conftest.py")
    prefix = short.removeprefix("test_")
    first = next(iter(layouts))
    for layout, runs in layouts.items():
        for run, cfg in runs.items():
            named = json.loads(json.dumps(cfg))
            named["runs"] = {(f"{prefix}.{run}" if r == run else r): entry for r, entry in cfg["runs"].items()}
            _LAYOUT_RUNS.setdefault(layout, {})[(short, run)] = _Registered(
                named, f"{prefix}.{run}", run in sum_grads, layout == first and run in again)

    def fixture(layout: str, second: bool = False):
        @pytest.fixture(scope="module", name=f"{layout}_again" if second else layout)
        def trained(layout_launches):
            results, log = layout_launches(layout, second)
            mine = [key for key in results if key[0] == short]
            return Launched({run: results[(m, run)] for m, run in mine}, log,
                            {run: _LAYOUT_RUNS[layout][(m, run)].name for m, run in mine})

        return trained

    return (*(fixture(layout) for layout in layouts), *((fixture(first, True),) if again else ()))


@pytest.fixture(scope="session")
def layout_launches(tiny_tokens, tmp_path_factory):
    """``launched(layout, again=False)``: ({(module, run): (summary, steps)}, log) of the launch of every run
    registered for ``layout`` (layout_fixtures), or of the second launch of those registered ``again``;
    each launch made once, when first asked for. Compiled runs train last in their launch, so that every
    other run trains in a process that has compiled nothing."""
    root = tmp_path_factory.mktemp("layouts")
    made: dict[tuple[str, bool], tuple[dict, str]] = {}

    def launched(layout: str, again: bool = False) -> tuple[dict, str]:
        if (layout, again) not in made:
            if again:
                launched(layout)  # the first launch, whose checkpoints the second resumes from
            runs = {key: r for key, r in _LAYOUT_RUNS[layout].items() if r.again or not again}
            order = sorted(runs, key=lambda key: bool(runs[key].config["runs"][runs[key].name].get("compile")))
            dirs = {key: root / layout / runs[key].name for key in order}
            log = train_jobs([(runs[key].config, runs[key].name, dirs[key]) for key in order], tiny_tokens,
                             root / layout, f"{layout}-again" if again else layout,
                             sum_grads=tuple(runs[key].name for key in order if runs[key].summed))
            made[layout, again] = {key: read_run(dirs[key]) for key in order}, log
        return made[layout, again]

    return launched


def assert_clipping_is_decisive(baseline, clipped_baseline, rtol: float) -> None:
    """``single`` with CLIPPED clips by a factor above 1e4 at every step, and its losses are more than 100 x
    ``rtol`` off ``single`` clipping at 1.0: a run that ignores clipping fails a check against it by far."""
    ref = clipped_baseline[1]
    assert all(r["grad_norm"] > 1e4 * CLIPPED["grad_clip"] for r in ref), [r["grad_norm"] for r in ref]
    gap = max_rel_gap(ref, baseline[1])
    print(f"single clipping at {CLIPPED['grad_clip']} vs at 1.0: max rel loss gap {gap:.1e}")
    assert gap > 100 * rtol


def max_rel_gap(steps, ref_steps, key: str = "loss") -> float:
    return max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(steps, ref_steps))


def assert_same_first_update(summary, ref_summary, rtol: float):
    """The first step's update of each tracked parameter (its norm) within ``rtol`` relative of the baseline."""
    got, ref = summary["first_update_norm"], ref_summary["first_update_norm"]
    assert got is not None and ref is not None and sorted(got) == sorted(ref), (got, ref)
    for name, value in ref.items():
        rel = abs(got[name] - value) / value
        assert rel <= rtol, f"first update of {name}: {got[name]} vs baseline {value} (rel {rel:.2e} > {rtol})"


@pytest.fixture(scope="session")
def shared_two(tiny_tokens, tmp_path_factory):
    """The 2-process runs of tests/shared_study.py (killed and resumed runs, their references, extras)."""
    from shared_study import train_layout

    return train_layout("two", tiny_tokens, tmp_path_factory.mktemp("shared-two"))


@pytest.fixture(scope="session")
def shared_four(tiny_tokens, tmp_path_factory):
    """The 4-process runs of tests/shared_study.py."""
    from shared_study import train_layout

    return train_layout("four", tiny_tokens, tmp_path_factory.mktemp("shared-four"))
