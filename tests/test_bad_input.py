"""Bad input gets a clear error naming the problem, before any work, and nothing under results/."""

import copy
import os
import subprocess
import sys

import pytest
import yaml
from conftest import BASE_CONFIG, REPO
from workflow_util import snakemake, write_config


def _study(tmp_path, mutate):
    """Run the workflow (not a dry run: nothing under results/ must mean no job started)."""
    cfg = copy.deepcopy(BASE_CONFIG)
    mutate(cfg)
    write_config(tmp_path, cfg)
    return snakemake(tmp_path, check=False, timeout=300)


def _empty(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")


def _short(tmp_path):
    (tmp_path / "short.txt").write_text("hello world\nsmall corpus\n")


CASES = {
    "files match nothing": (lambda c, t: c["data"].update(source="text", files=[str(t / "nope" / "*.txt")]),
                            None, "matches no file"),
    "empty corpus": (lambda c, t: c["data"].update(source="text", files=[str(t / "empty.txt")]), _empty,
                     "corpus is empty"),
    "corpus too short": (lambda c, t: c["data"].update(source="text", files=[str(t / "short.txt")]), _short,
                         "corpus too short"),
    "unknown strategy": (lambda c, t: c["runs"].update(x={"strategy": "warp_parallel"}), None,
                         "runs.x.strategy"),
    "unknown model size": (lambda c, t: c["model"].update(size="13B"), None, "model.size"),
    "sizes do not divide": (lambda c, t: c["runs"].update(tp={"strategy": "tensor_parallel", "tp": 2,
                                                              "gpus_per_node": 3}), None, "not divisible"),
    "zero learning rate": (lambda c, t: c["train"].update(lr=0), None, "train.lr"),
    "negative learning rate": (lambda c, t: c["train"].update(lr=-0.1), None, "train.lr"),
    "dataset not loadable offline": (lambda c, t: c["data"].update(source="hf", hf={"name": "wikitext"}), None,
                                     "cannot load dataset 'wikitext'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_workflow_rejects_bad_input(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no retries against an unreachable hub
    mutate, prepare_files, message = CASES[case]
    if prepare_files:
        prepare_files(tmp_path)
    proc = _study(tmp_path, lambda c: mutate(c, tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in out, out[-2000:]
    assert not (tmp_path / "results").exists()


def test_cli_refuses_a_model_that_cannot_fit(tiny_tokens, tmp_path):
    """The seed's `--model_size 1B` data-parallel run on a small CPU machine: a prediction, not a crash."""
    out = tmp_path / "results" / "runs" / "ddp"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--strategy", "data_parallel", "--model_size", "1B",
         "--device", "cpu", "--tokens", str(tiny_tokens), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2
    assert "predicted peak memory" in proc.stderr and "GiB" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_cli_names_a_bad_flag_combination(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--strategy", "pipeline_parallel", "--stages", "9",
         "--model_size", "tiny", "--out", str(tmp_path / "results" / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "layers cannot fill" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_workflow_refuses_a_config_key_given_twice(tmp_path):
    """Snakemake reads --configfile with its own YAML loader (a second `runs:` section silently replaces the
    first); the workflow reads its config files again strictly and stops before any job."""
    cfg = copy.deepcopy(BASE_CONFIG)
    text = yaml.safe_dump(cfg, sort_keys=False) + "runs:\n  ddp: {strategy: data_parallel}\n"
    (tmp_path / "config.yaml").write_text(text)
    proc = snakemake(tmp_path, check=False, timeout=300)
    out = proc.stdout + proc.stderr
    line = text.splitlines().index("runs:", 0) + 1
    assert proc.returncode != 0
    assert f"key 'runs' is given twice in the same mapping (first on line {line})" in out, out[-2000:]
    assert not (tmp_path / "results").exists()


def test_cli_refuses_a_model_that_cannot_fit_before_building_its_data(tmp_path):
    """Without --tokens the CLI builds its own corpus under results/cli/data/; the fit check comes first
    (with the tokenizer's target vocabulary), so a refused run leaves nothing behind."""
    from llmpar import run_cli

    argv = ["--strategy", "data_parallel", "--model_size", "1B", "--device", "cpu", "--seed", "918273",
            "--out", str(tmp_path / "out")]
    data = run_cli.cli_data_root(run_cli._cli_config(run_cli.parse_args(argv))[0])
    assert not data.exists()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *argv], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "predicted peak memory" in proc.stderr, proc.stderr[-2000:]
    assert not data.exists() and not (tmp_path / "out").exists()
