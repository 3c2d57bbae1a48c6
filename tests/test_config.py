"""Config validation: schema defaults, errors that name the key, sweeps, layout checks."""

import pytest

from llmpar.config import expand_runs, prepare
from llmpar.errors import ConfigError
from llmpar.shape import MODEL_SIZES


def cfg(runs=None, **sections):
    c = {"runs": runs or {"single": {"strategy": "single"}}, "baseline": "single"}
    c.update(sections)
    return c


def test_defaults_fill_every_section():
    c = prepare(cfg())
    assert c["study"] == "tiny-cpu" and c["train"]["global_batch"] == 8 and c["data"]["source"] == "synthetic"
    assert c["runs"]["single"]["dp"] == 1 and c["runs"]["single"]["micro_batch_size"] == 8


@pytest.mark.parametrize("section,value,key", [
    ("train", {"lr": 0}, "train.lr"),
    ("train", {"lr": -1e-3}, "train.lr"),
    ("model", {"size": "7B"}, "model.size"),
    ("data", {"source": "ftp"}, "data.source"),
    ("train", {"global_batch": "eight"}, "train.global_batch"),
])
def test_schema_errors_name_the_key(section, value, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        prepare(cfg(**{section: value}))


def test_unknown_strategy_names_the_run():
    with pytest.raises(ConfigError, match=r"runs\.x\.strategy"):
        prepare(cfg({"single": {"strategy": "single"}, "x": {"strategy": "magic"}}))


def test_baseline_must_name_a_run():
    with pytest.raises(ConfigError, match="baseline"):
        prepare({"runs": {"a": {"strategy": "single"}}, "baseline": "b"})


@pytest.mark.parametrize("run,match", [
    ({"strategy": "tensor_parallel", "gpus_per_node": 3, "tp": 2}, "not divisible by tp 2"),
    ({"strategy": "tensor_parallel", "tp": 3, "gpus_per_node": 3}, "must divide the attention heads"),
    ({"strategy": "pipeline_parallel", "stages": 5}, "layers cannot fill"),
    ({"strategy": "data_parallel", "gpus_per_node": 3}, "global batch 8 is not divisible by dp 3"),
    ({"strategy": "zero", "zero_stage": 3, "stages": 2, "gpus_per_node": 4}, "rejected by DeepSpeed by design"),
    ({"strategy": "single", "gpus_per_node": 2}, "one process"),
    ({"strategy": "fsdp", "gpus_per_node": 2, "ddp_bucket_mb": 100}, "ddp_bucket_mb applies to strategy data_parallel"),
])
def test_layout_errors(run, match):
    with pytest.raises(ConfigError, match=match):
        prepare(cfg({"single": {"strategy": "single"}, "bad": run}))


def test_sweep_expands_with_deterministic_names():
    runs = expand_runs({"ddp": {"strategy": "data_parallel", "gpus_per_node": [1, 2, 4]}})
    assert list(runs) == ["ddp-g1", "ddp-g2", "ddp-g4"]
    c = prepare(cfg({"single": {"strategy": "single"}, "h": {"strategy": "hybrid_parallel", "nodes": [1, 2],
                                                             "gpus_per_node": 2}}))
    assert [(n, r["world_size"] if "world_size" in r else r["nodes"] * r["gpus_per_node"], r["dp"])
            for n, r in c["runs"].items() if n != "single"] == [("h-n1", 2, 1), ("h-n2", 4, 2)]


def test_pipeline_defaults_and_global_batch():
    c = prepare(cfg({"single": {"strategy": "single"}, "pp": {"strategy": "pipeline_parallel", "stages": 2}}))
    pp = c["runs"]["pp"]
    assert pp["gpus_per_node"] == 2 and pp["micro_batches"] * pp["micro_batch_size"] * pp["dp"] == 8


def test_model_sizes_match_published_shapes():
    from llmpar.shape import param_counts

    assert 1.05e9 < param_counts({"size": "1B", "seq_len": 2048}, 32000)["total"] < 1.15e9
    assert MODEL_SIZES["1B"]["num_kv_heads"] == 4
    assert 110e6 < param_counts({"size": "125M", "seq_len": 1024}, 50257)["total"] < 180e6


@pytest.mark.parametrize("name", ["../../../escape", "..", "x;touch f", "a b", "run/1", ""])
def test_run_names_that_would_leave_results_or_reach_a_shell_are_refused(name):
    with pytest.raises(ConfigError, match="run name"):
        prepare(cfg({name: {"strategy": "single"}, "single": {"strategy": "single"}}))


@pytest.mark.parametrize("study", ["..", ".", "a/b", "x;y"])
def test_study_names_that_would_leave_results_are_refused(study):
    with pytest.raises(ConfigError, match="study"):
        prepare(cfg(study=study))


def test_names_in_the_allowed_alphabet_pass():
    c = prepare(cfg({"zero-1.b_2": {"strategy": "single"}, "single": {"strategy": "single"}}, study="h100x2-1b"))
    assert "zero-1.b_2" in c["runs"]


@pytest.mark.parametrize("run,match", [
    ({"strategy": "data_parallel", "tp": 2, "gpus_per_node": 2}, r"runs\.bad: data_parallel takes no tp or stages"),
    ({"strategy": "tensor_parallel", "tp": 1, "gpus_per_node": 2}, r"runs\.bad: tensor_parallel needs tp > 1"),
    ({"strategy": "pipeline_parallel", "stages": 2, "gpus_per_node": 4}, "runs one pipeline: world size 4"),
    ({"strategy": "hybrid_parallel", "stages": 1, "gpus_per_node": 2}, "hybrid_parallel needs stages > 1"),
    ({"strategy": "fsdp", "stages": 2, "gpus_per_node": 2}, "fsdp composes with tp, not with stages"),
    ({"strategy": "zero", "tp": 2, "gpus_per_node": 2}, "zero composes with stages"),
    ({"strategy": "zero", "zero_stage": 4, "gpus_per_node": 2}, r"runs\.bad\.zero_stage must be 0, 1, 2 or 3"),
    ({"strategy": "data_parallel", "zero_stage": 1, "gpus_per_node": 2}, "zero_stage applies to strategy zero"),
    ({"strategy": "data_parallel", "gpus_per_node": 0}, r"runs\.bad\.gpus_per_node must be >= 1, got 0"),
    ({"strategy": "data_parallel", "gpus_per_node": 2, "micro_batch_size": 3}, "micro_batch_size 3"),
    ({"strategy": "pipeline_parallel", "stages": 2, "micro_batches": 3, "schedule": "interleaved_1f1b",
      "pp_engine": "torch"}, r"global batch 8 is not divisible by dp 1 x micro-batches 3"),
    ({"strategy": "pipeline_parallel", "stages": 2, "micro_batches": 1, "schedule": "interleaved_1f1b",
      "pp_engine": "torch"}, r"interleaved_1f1b needs micro-batches \(1\) divisible by stages \(2\)"),
    ({"strategy": "pipeline_parallel", "stages": 4, "micro_batches": 2, "schedule": "interleaved_1f1b",
      "pp_engine": "torch", "gpus_per_node": 4}, "layers cannot fill 8 pipeline chunks"),
    ({"strategy": "data_parallel", "pp_engine": "torch", "gpus_per_node": 2},
     r"runs\.bad\.pp_engine does not apply to strategy data_parallel"),
    ({"strategy": "zero", "tp_engine": "torch", "gpus_per_node": 2}, r"tp_engine does not apply to strategy zero"),
    # what an engine cannot run: refused here, not after the processes have started
    ({"strategy": "zero", "zero_stage": 0, "gpus_per_node": 2}, r"runs\.bad\.zero_stage: strategy zero needs"),
    ({"strategy": "pipeline_parallel", "stages": 2, "schedule": "gpipe", "pp_engine": "deepspeed"},
     "runs only its 1F1B TrainSchedule, not gpipe"),
    ({"strategy": "pipeline_parallel", "stages": 2, "schedule": "interleaved_1f1b", "pp_engine": "deepspeed"},
     "runs only its 1F1B TrainSchedule, not interleaved_1f1b"),
    ({"strategy": "pipeline_parallel", "stages": 1, "schedule": "gpipe", "pp_engine": "deepspeed"},
     "runs only its 1F1B TrainSchedule, not gpipe"),  # one stage is still DeepSpeed's pipeline engine
    ({"strategy": "zero", "zero_stage": 1, "stages": 2, "gpus_per_node": 2, "pp_engine": "torch"},
     r"runs\.bad\.pp_engine: ZeRO-1 with pipeline stages runs on DeepSpeed's pipeline engine"),
    ({"strategy": "pipeline_parallel", "stages": 1, "pp_engine": "deepspeed", "precision": "bf16-pure"},
     "bf16-pure .* requires ZeRO stage 1-3"),
    ({"strategy": "hybrid_parallel", "stages": 2, "tp": 2, "gpus_per_node": 4, "pp_engine": "deepspeed"},
     "cannot run AutoTP inside its stages"),
    ({"strategy": "hybrid_parallel", "stages": 2, "tp": 2, "gpus_per_node": 4, "pp_engine": "torch",
      "tp_engine": "deepspeed"}, "tensor parallel inside pipeline stages runs on the torch"),
    ({"strategy": "fsdp", "tp": 2, "gpus_per_node": 2, "tp_engine": "deepspeed"}, "fsdp x tp runs on the torch"),
    ({"strategy": "pipeline_parallel", "stages": 4, "gpus_per_node": 4, "micro_batches": 2, "pp_engine": "torch"},
     r"1f1b needs at least as many micro-batches \(2\) as stages \(4\)"),
    ({"strategy": "data_parallel", "offload": "optimizer", "gpus_per_node": 2},
     r"runs\.bad\.offload: offload optimizer needs DeepSpeed ZeRO"),
    ({"strategy": "zero", "zero_stage": 2, "offload": "parameters", "gpus_per_node": 2},
     "offload parameters needs ZeRO stage 3"),
    ({"strategy": "tensor_parallel", "tp": 2, "tp_engine": "deepspeed", "precision": "bf16-pure"},
     "bf16-pure .* requires ZeRO stage 1-3"),
])
def test_semantic_checks_name_the_run_and_the_problem(run, match):
    """The checks a schema cannot express (llmpar.config.resolve_run), each refusing before any job."""
    with pytest.raises(ConfigError, match=match):
        prepare(cfg({"single": {"strategy": "single"}, "bad": run}))


@pytest.mark.parametrize("raw,match", [
    (cfg(data={"source": "text"}), r"data\.files.*no files are listed"),
    (cfg(tokenizer={"kind": "pretrained"}), r"tokenizer\.pretrained.*no path is given"),
    (cfg(model={"hidden_size": 100, "num_heads": 3}), "hidden_size 100 is not divisible by num_heads 3"),
    (cfg({"single": {"strategy": "single"}, "d": {"strategy": "data_parallel", "gpus_per_node": [2, 4]},
          "d-g2": {"strategy": "data_parallel"}}), "expanded run name 'd-g2' collides"),
])
def test_study_level_checks(raw, match):
    with pytest.raises(ConfigError, match=match):
        prepare(raw)


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  lr: 0.003\n  steps: 4\n  lr: 0.5\nruns:\n  single: {strategy: single}\nbaseline: single\n",
     "lr", (4, 2)),
    ("runs:\n  single: {strategy: single}\nbaseline: single\nruns:\n  ddp: {strategy: data_parallel}\n",
     "runs", (4, 1)),
    ("runs:\n  a: {strategy: single, tp: 1, tp: 2}\nbaseline: a\n", "tp", (2, 2)),
], ids=["train-key", "section", "flow-mapping"])
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, text, key, lines):
    """YAML keeps the last of two equal keys without a word; a config file naming one twice is refused with
    the key and both lines, JSON included (a JSON file is read as YAML)."""
    from llmpar.config import load_yaml

    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}, line {lines[0]}: key '{key}' is given twice in the same mapping "
                                          rf"\(first on line {lines[1]}\)"):
        load_yaml(path)
    path.write_text('{"runs": {"a": {"strategy": "single"}}, "baseline": "a", "baseline": "b"}')
    with pytest.raises(ConfigError, match="key 'baseline' is given twice"):
        load_yaml(path)
    path.write_text("runs: {a: {strategy: single}}\nbaseline: a\ntrain: {lr: 0.5}\n")
    assert load_yaml(path)["train"] == {"lr": 0.5}
