"""The constants of each card the plan predicts with (``llmpar/cards.yaml``, each with its source)."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

CARDS_PATH = Path(__file__).resolve().parents[1] / "cards.yaml"


@functools.cache
def cards() -> dict:
    return yaml.safe_load(CARDS_PATH.read_text())


def card_names() -> list[str]:
    return [k for k, v in cards().items() if isinstance(v, dict) and "gemm_tflops" in v]


def card(name: str) -> dict:
    """A card's constants (with the constants shared by all cards). ``name``: a key of cards.yaml."""
    data = cards()
    if name not in card_names():
        raise KeyError(f"unknown card {name!r}; cards.yaml knows {card_names()}")
    return {**data[name], "allocator_overhead_gib": data["allocator_overhead_gib"],
            "eager_elementwise_factor": data["eager_elementwise_factor"], "cluster": data["cluster"]}


def card_for_device(device_name: str | None) -> str | None:
    """The cards.yaml key whose ``name`` the CUDA device name contains (None when unknown)."""
    for key, value in cards().items():
        if isinstance(value, dict) and value.get("name") and device_name and value["name"] in device_name:
            return key
    return None
