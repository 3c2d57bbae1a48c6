"""Predict before you run: per-rank peak memory and step time of a run from its shape and layout.

The plan counts what each rank holds and does (:mod:`llmpar.plan.memory`, :mod:`llmpar.plan.step`), and
takes rates from a card's measured constants (``llmpar/cards.yaml``, each with its source;
:mod:`llmpar.plan.cards`). :mod:`llmpar.plan.predict` gives one run's prediction and the micro-batch that
fits a card, :mod:`llmpar.plan.calibration` checks the predictions against recorded runs,
:mod:`llmpar.plan.extrapolate` applies them to layouts no run has (8 to 1024 GPUs) and
:mod:`llmpar.plan.pipeline` simulates torch's interleaved schedule.

It imports only the model's shape (:mod:`llmpar.shape`) and the run layout (:mod:`llmpar.layout`): no torch,
no config loading, so the launcher can refuse a layout before any process starts.
"""

from llmpar.plan.cards import card, card_for_device
from llmpar.plan.predict import FIT_MARGIN, auto_micro_batch, fits, predict

__all__ = ["FIT_MARGIN", "auto_micro_batch", "card", "card_for_device", "fits", "predict"]
