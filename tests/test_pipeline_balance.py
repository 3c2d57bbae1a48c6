"""``pipeline_balance``: a torch pipeline cuts its stages by parameters or by training FLOPs, the engine and
the plan by one count; the FLOP cut gives the stage with the output head fewer layers; DeepSpeed's pipeline
refuses it before any process starts."""

import pytest
from conftest import make_config

from llmpar.config import prepare
from llmpar.errors import ConfigError
from llmpar.layout import RunSpec
from llmpar.model import build_model, model_shape
from llmpar.plan.memory import pipeline_ranks
from llmpar.shape import balanced_split, pipeline_layer_weights, shape_of
from llmpar.strategies.pp_torch import chunk_layer_ranges

TINY = {"size": "tiny", "seq_len": 64, "num_layers": 8}
ONE_B = {"size": "1B", "seq_len": 2048, "vocab_size": 32000}


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(TINY, 512, seed=1)


@pytest.mark.parametrize("balance", ["parameters", "flops"])
@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_engine_cuts_the_stages_the_plan_counts(tiny_model, balance, chunks):
    assert model_shape(tiny_model.config) == shape_of(TINY, 512)  # the built model's shape is the plan's
    assert chunk_layer_ranges(tiny_model, chunks, balance) == balanced_split(
        pipeline_layer_weights(shape_of(TINY, 512), balance), chunks)


def test_flops_give_the_head_stage_fewer_layers():
    """The 1.1B model: by parameters the embedding and the head weigh the same (11 + 11 layers on 2 stages);
    by FLOPs the head weighs ~1.4 layers and the embedding nothing (12 + 10; 6 + 6 + 6 + 4 on 4 stages)."""
    sh = shape_of(ONE_B, 32000)
    layers = {(b, p): [r["layers"] for r in pipeline_ranks(sh, RunSpec(name="pp", strategy="pipeline_parallel",
                                                                        stages=p, pipeline_balance=b))]
              for b in ("parameters", "flops") for p in (2, 4)}
    assert layers == {("parameters", 2): [11, 11], ("flops", 2): [12, 10],
                      ("parameters", 4): [5, 6, 6, 5], ("flops", 4): [6, 6, 6, 4]}
    head = pipeline_layer_weights(sh, "flops")[-1] / pipeline_layer_weights(sh, "flops")[0] - 1
    assert 1.3 < head < 1.45


def test_deepspeed_pipeline_refuses_a_flop_balance():
    with pytest.raises(ConfigError, match="pipeline_balance: .*DeepSpeed's PipelineModule partitions by parameters"):
        prepare(make_config(runs={"pp": {"strategy": "pipeline_parallel", "stages": 2, "micro_batches": 4,
                                         "pp_engine": "deepspeed", "pipeline_balance": "flops"}}))
