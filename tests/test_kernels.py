"""The kernel choices are config (``train.attention``, ``train.fused_loss``), part of every run's config
and so of its hash, not environment variables: what each selects, and that CPU runs are untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from torch.nn.attention import SDPBackend

from llmpar.config import prepare, run_config
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
