"""The kernel levers on one CUDA GPU train the same model as ``single``: the equivalence study of the GPU
suite (``gpu_util.GPU_STUDY``) with one GEMM for q/k/v and one for gate/up (``fused_projections``) and, in bf16,
with the residual stream in bf16 (``precision: bf16-residual``), with bf16 weights and fp32 masters
(``precision: bf16-master``), with FlashAttention-4 (``train.attention`` fa4 and fa4-op, where the host has the
flash-attn-4 package) and with quack-kernels' gated MLP (``mlp: quack``, where the host has quack-kernels; alone
and with fused_projections) and its RMSNorms with the residual adds fused (``norm: quack``), and the fastest
combination of them, against ``single`` with the same compile setting and precision (bf16 for bf16-residual;
bf16-master and the combination against bf16-residual): fp32 losses, gradient norms and first updates within 1e-3,
bf16 within 2 %, the gradient norms after the first step of a run in another precision within 5 %
(``gpu_util.check_tracks``).
One launch on one GPU for all of them."""

import json

import pytest
from gpu_util import GPU_STUDY, STEPS, build_tokens, check_tracks, gpu_count, launch_batch, read_run

from llmpar.config import prepare, run_config
from llmpar.kernels import FA4, FA4_DISTRIBUTION, KERNELS_INSTALL, QUACK_DISTRIBUTION
from llmpar.metrics.env import package_version

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(gpu_count() < 1, reason="the lever tests need a CUDA GPU; found none")]

LEVERS = {
    "fused": {"fused_projections": True},
}


# FlashAttention-4, a study-wide lever (train.attention): each value trained as the `single` run of a study that
# sets it, in bf16 (FA4 takes no fp32), where this host has the package (else its tests skip, saying why)
FA4_PRESENT = package_version(FA4_DISTRIBUTION) is not None
QUACK_PRESENT = package_version(QUACK_DISTRIBUTION) is not None
# the fastest combination of configs/gpu1-1b-kernels.yaml (with bf16-master), on quack's default tiles
COMBINED = {"attention": "fa4-op", "mlp": "quack", "norm": "quack"}


def lever_study(precision: str, train: dict | None = None, levers: dict = LEVERS) -> dict:
    cfg = json.loads(json.dumps(GPU_STUDY))
    steps = STEPS["fp32" if precision == "fp32" else "bf16"]
    cfg["train"].update(steps=steps, precision=precision, compile=True, **(train or {}))
    cfg["runs"] = {"single": {"strategy": "single"}, **{n: {"strategy": "single", **kw} for n, kw in levers.items()}}
    cfg["baseline"] = "single"
    return prepare(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    tokens = build_tokens(lever_study("fp32"), root / "data")
    jobs = [(run_config(lever_study(p), name), root / p / name) for p in STEPS for name in ("single", *LEVERS)]
    jobs += [(run_config(lever_study("bf16", {"attention": name}), "single"), root / "bf16" / name)
             for name in FA4 if FA4_PRESENT]
    jobs += [(run_config(lever_study(p), "single"), root / "bf16" / p) for p in ("bf16-residual", "bf16-master")]
    quack = lever_study("bf16", {"mlp": "quack"}, levers={"fused": {"fused_projections": True}})
    jobs += [(run_config(quack, "single"), root / "bf16" / "quack-mlp"),
             (run_config(quack, "fused"), root / "bf16" / "quack-mlp-fused"),
             (run_config(lever_study("bf16", {"norm": "quack"}), "single"), root / "bf16" / "quack-norm"),
             ] if QUACK_PRESENT else []
    jobs += [(run_config(lever_study("bf16-master", COMBINED), "single"), root / "bf16" / "combined")
             ] if QUACK_PRESENT and FA4_PRESENT else []
    launch_batch(jobs, tokens, root, timeout=1200)
    return {p: {out.name: read_run(out) for _, out in jobs if out.parent.name == p} for p in STEPS}


@pytest.mark.parametrize("precision", list(STEPS))
@pytest.mark.parametrize("name", list(LEVERS))
def test_lever_tracks_single(runs, name, precision):
    summary = runs[precision][name][0]
    for key, value in LEVERS[name].items():
        assert summary["spec"][key] == value, (key, summary["spec"].get(key))
    check_tracks(runs[precision], name, precision)


@pytest.mark.parametrize("name", FA4)
def test_fa4_tracks_single(runs, name):
    if not FA4_PRESENT:
        pytest.skip(f"the {FA4_DISTRIBUTION} package is not installed ({KERNELS_INSTALL})")
    # the lever's study is another training config: another hash (a checkpoint of one is not resumed by the other)
    assert runs["bf16"][name][0]["config_hash"] != runs["bf16"]["single"][0]["config_hash"]
    check_tracks(runs["bf16"], name, "bf16")


def test_bf16_residual_tracks_bf16(runs):
    """The residual stream in bf16 (the embedding's output cast) against bf16 autocast's fp32 stream: a
    different rounding path, the same training within bf16's tolerance."""
    check_tracks(runs["bf16"], "bf16-residual", "bf16", own_precision="bf16-residual")


def test_bf16_master_tracks_bf16_residual(runs):
    """bf16 weights in the model with fp32 masters in the optimizer against bf16-residual, whose residual stream is
    bf16 as well (against bf16's fp32 stream the two roundings add up: on an H100 bf16-master's gradient norms were
    2.5 % from bf16's, bf16-residual's 1.5 %; benchmarks/results/test_levers_gpu_master_h100.txt)."""
    pair = {"single": runs["bf16"]["bf16-residual"], "bf16-master": runs["bf16"]["bf16-master"]}
    check_tracks(pair, "bf16-master", "bf16-residual", own_precision="bf16-master")


@pytest.mark.parametrize("name,fused", [("quack-mlp", False), ("quack-mlp-fused", True)])
def test_quack_mlp_tracks_single(runs, name, fused):
    """quack's gated MLP (SwiGLU in the GEMMs' epilogues) against torch's MLP, both bf16 autocast, alone and with
    one GEMM for q/k/v (fused_projections)."""
    if not QUACK_PRESENT:
        pytest.skip(f"the {QUACK_DISTRIBUTION} package is not installed ({KERNELS_INSTALL})")
    assert runs["bf16"][name][0]["spec"]["mlp"] == "quack"
    assert runs["bf16"][name][0]["spec"]["fused_projections"] is fused
    check_tracks(runs["bf16"], name, "bf16")


def test_quack_norm_tracks_single(runs):
    """quack's RMSNorms, each fused with the residual add before it (the layers handing each other the stream and
    the MLP output unsummed), against LlamaRMSNorm under inductor, both bf16 autocast."""
    if not QUACK_PRESENT:
        pytest.skip(f"the {QUACK_DISTRIBUTION} package is not installed ({KERNELS_INSTALL})")
    assert runs["bf16"]["quack-norm"][0]["spec"]["norm"] == "quack"
    check_tracks(runs["bf16"], "quack-norm", "bf16")


def test_combination_tracks_bf16_residual(runs):
    """FlashAttention-4 as a custom op, quack's gated MLP and RMSNorms, and bf16 weights with fp32 masters together,
    against bf16-residual (torch's attention, MLP and norms)."""
    if not (QUACK_PRESENT and FA4_PRESENT):
        pytest.skip(f"the {FA4_DISTRIBUTION} and {QUACK_DISTRIBUTION} packages are not both installed "
                    f"({KERNELS_INSTALL})")
    spec = runs["bf16"]["combined"][0]["spec"]  # (train.attention is study-wide: in the hash, not the spec)
    assert (spec["mlp"], spec["norm"]) == (COMBINED["mlp"], COMBINED["norm"]), spec
    pair = {"single": runs["bf16"]["bf16-residual"], "combined": runs["bf16"]["combined"]}
    check_tracks(pair, "combined", "bf16-residual", own_precision="bf16-master")
