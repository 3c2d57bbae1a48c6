"""The kernel choices are config (``train.attention``, ``train.fused_loss``), part of every run's config
and so of its hash, not environment variables: what each selects, and that CPU runs are untouched."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, assert_config_refused, assert_host_refused, make_config, pretend_host
from torch.nn.attention import SDPBackend

from llmpar import preflight
from llmpar.config import prepare, run_config
from llmpar.errors import ConfigError
from llmpar.model import attention_backends
from llmpar.strategies.loss import cross_entropy, cross_entropy_for


def priority() -> list[int]:
    return torch._C._get_sdp_priority_order()  # what SDPA consults (no public getter)


@pytest.mark.parametrize("name,first", [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)])
def test_attention_puts_its_backend_first_on_cuda_for_the_run_and_restores(name, first):
    before = priority()
    with attention_backends(name, "cuda"):
        assert priority()[0] == int(first)
        # only the order changes: every backend stays enabled, so inputs one refuses fall through
        assert all(getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in ("flash", "mem_efficient",
                                                                                 "math", "cudnn"))
    assert priority() == before


def test_attention_default_and_cpu_leave_the_order_alone():
    before = priority()
    for name, device in (("default", "cuda"), ("cudnn", "cpu"), ("flash", "cpu")):
        with attention_backends(name, device):
            assert priority() == before


def test_fused_loss_selects_the_compiled_cross_entropy_on_cuda_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cross_entropy_for(cuda, fused=False) is cross_entropy
    assert cross_entropy_for(cpu, fused=True) is cross_entropy
    fused = cross_entropy_for(cuda, fused=True)  # compiled lazily: nothing runs here
    assert fused is not cross_entropy and fused is cross_entropy_for(cuda, fused=True)


def test_kernel_choices_are_in_the_run_config():
    """A run's hash covers its config: changing a kernel choice is a different run (the workflow reruns
    it, a checkpoint of the other choice is not resumed)."""
    train = run_config(prepare(make_config()), "single")["train"]
    assert (train["attention"], train["fused_loss"]) == ("cudnn", True)
    other = run_config(prepare(make_config(train={"attention": "flash", "fused_loss": False})), "single")["train"]
    assert (other["attention"], other["fused_loss"]) == ("flash", False)


# -- train.attention: fa4 (FlashAttention-4): refused, with the reason, wherever it cannot run

def fa4_config(**train) -> dict:
    return make_config(runs={"ddp": {"strategy": "data_parallel", "precision": "bf16"}},
                       train={"attention": "fa4", "device": "cuda", "precision": "bf16", **train})


def test_fa4_is_a_study_setting_of_cuda_bf16_runs():
    cfg = prepare(fa4_config())
    assert run_config(cfg, "ddp")["train"]["attention"] == "fa4"


@pytest.mark.parametrize("change,reason", [
    ({"train": {"device": "cpu"}}, "train.device is cpu"),
    ({"runs": {"ddp": {"strategy": "data_parallel", "precision": "fp32"}}}, "run(s) ddp train in precision fp32"),
    ({"model": {"size": "tiny", "seq_len": 32, "num_heads": 16, "num_kv_heads": 2}}, "this model's is 4"),
])
def test_fa4_config_that_cannot_have_it_is_refused_naming_why(change, reason):
    cfg = fa4_config()
    for section, values in change.items():
        cfg[section].update(values)
    assert_config_refused(cfg, "train.attention", reason)


@pytest.mark.parametrize("capability,installed,reason", [
    (None, "4.0.0b40", "this host has none"),
    ((8, 0), "4.0.0b40", "this one is 8.0"),
    ((9, 0), None, "flash-attn-4 package, which is not installed"),
])
def test_fa4_host_that_cannot_run_it_is_refused_before_any_process(monkeypatch, capability, installed, reason):
    rc = run_config(prepare(fa4_config()), "ddp")
    assert_host_refused(monkeypatch, rc, capability, installed, "run ddp: attention fa4 ", reason)


def test_fa4_host_with_a_hopper_gpu_and_the_package_passes(monkeypatch):
    pretend_host(monkeypatch, (9, 0), "4.0.0b40")
    preflight.check_kernels(run_config(prepare(fa4_config()), "ddp"))


def test_fa4_run_on_this_cpu_host_exits_before_writing_anything(tmp_path):
    """The CLI's check comes before any process starts and before anything is written (no GPU here)."""
    out, config = tmp_path / "run", tmp_path / "fa4.yaml"
    config.write_text(json.dumps(fa4_config()))  # JSON is YAML
    got = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(config), "--run", "ddp",
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert got.returncode == 2, got.stderr[-2000:]
    assert "run ddp: attention fa4 needs a CUDA GPU, and this host has none" in got.stderr
    assert not out.exists()


def test_fa4_op_refusal_names_the_value_asked_for():
    cfg = fa4_config(attention="fa4-op", device="cpu")
    why = "config key .train.attention.: attention fa4-op runs on CUDA GPUs, and train.device is cpu"
    with pytest.raises(ConfigError, match=why):
        prepare(cfg)


def test_a_run_sets_its_own_attention_kernel():
    """runs.<name>.attention: that run's kernel (part of its config, so of its hash); the others keep
    train.attention's."""
    cfg = prepare(make_config(runs={"a": {"strategy": "single", "precision": "bf16"},
                                    "b": {"strategy": "single", "precision": "bf16", "attention": "fa4-op"}},
                              train={"device": "cuda", "precision": "bf16"}, baseline="a"))
    assert run_config(cfg, "a")["train"]["attention"] == "cudnn"
    assert run_config(cfg, "b")["train"]["attention"] == "fa4-op"


@pytest.mark.parametrize("runs,key,reason", [
    ({"b": {"strategy": "single", "attention": "fa4-op"}}, "runs.b.attention", "run(s) b train in precision fp32"),
    ({"b": {"strategy": "single", "precision": "bf16", "attention": "fa4"}}, "runs.b.attention",
     "attention fa4 runs on CUDA GPUs, and train.device is cpu"),
])
def test_a_runs_fa4_that_cannot_run_is_refused_naming_its_key(runs, key, reason):
    cfg = make_config(runs={"a": {"strategy": "single"}, **runs}, baseline="a")
    if "precision" not in runs["b"]:
        cfg["train"]["device"] = "cuda"
    assert_config_refused(cfg, f"config key '{key}'", reason)
