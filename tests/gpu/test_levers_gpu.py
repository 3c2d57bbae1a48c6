"""The kernel levers on one CUDA GPU train the same model as ``single``: the equivalence study of the GPU
suite (``gpu_util.GPU_STUDY``) with one GEMM for q/k/v and one for gate/up (``fused_projections``), against
``single`` with the same compile setting and precision: fp32 losses, gradient norms and first updates within
1e-3, bf16 within 2 % (``gpu_util.check_tracks``). One launch on one GPU for all of them."""

import json

import pytest
from gpu_util import GPU_STUDY, STEPS, build_tokens, check_tracks, gpu_count, launch_batch, read_run

from llmpar.config import prepare, run_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(gpu_count() < 1, reason="the lever tests need a CUDA GPU; found none")]

LEVERS = {
    "fused": {"fused_projections": True},
}


def lever_study(precision: str) -> dict:
    cfg = json.loads(json.dumps(GPU_STUDY))
    cfg["train"].update(steps=STEPS[precision], precision=precision, compile=True)
    cfg["runs"] = {"single": {"strategy": "single"}, **{n: {"strategy": "single", **kw} for n, kw in LEVERS.items()}}
    cfg["baseline"] = "single"
    return prepare(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    tokens = build_tokens(lever_study("fp32"), root / "data")
    jobs = [(run_config(lever_study(p), name), root / p / name) for p in STEPS for name in ("single", *LEVERS)]
    launch_batch(jobs, tokens, root, timeout=1200)
    return {p: {name: read_run(root / p / name) for name in ("single", *LEVERS)} for p in STEPS}


@pytest.mark.parametrize("precision", list(STEPS))
@pytest.mark.parametrize("name", list(LEVERS))
def test_lever_tracks_single(runs, name, precision):
    summary = runs[precision][name][0]
    for key, value in LEVERS[name].items():
        assert summary["spec"][key] == value, (key, summary["spec"].get(key))
    check_tracks(runs[precision], name, precision)
