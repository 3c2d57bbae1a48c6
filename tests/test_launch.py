"""The launcher's pieces that decide where workers run, and runs that share one launch (--batch)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, assert_same_first_update, assert_same_steps, make_config

from llmpar import launch
from llmpar.config import load_schema, prepare, run_config
from llmpar.errors import ExpectedFailure
from llmpar.launch import local_node_gpus
from llmpar.run_cli import cli_run_keys, parse_args


def test_cli_flags_are_the_schemas_keys():
    """The train CLI's layout flags, their choices and types come from the config schema: a strategy, engine
    or schedule added there is a flag here, and a value the schema refuses the CLI refuses too."""
    run = load_schema()["properties"]["runs"]["additionalProperties"]["properties"]
    # the run's global batch is the study flag --global_batch on a one-run CLI
    assert set(cli_run_keys()) == set(run) - {"fault", "runtime_min", "reshard_after_forward", "global_batch"}
    for key, prop in run.items():
        if "enum" in prop and key in cli_run_keys():
            assert getattr(parse_args([f"--{key}", prop["enum"][-1]]), key) == prop["enum"][-1]
            with pytest.raises(SystemExit):
                parse_args([f"--{key}", "not-a-" + key])
    a = parse_args(["--strategy", "hybrid_parallel", "--nodes", "2", "--gpus_per_node", "1", "--model_size", "1B",
                    "--compile", "--lr", "0.001"])
    assert (a.nodes, a.gpus_per_node, a.model_size, a.compile, a.lr) == (2, 1, "1B", True, 0.001)


def test_local_nodes_get_their_own_gpus():
    """Two local "nodes" must not both take cuda:0 (NCCL: Duplicate GPU detected)."""
    assert local_node_gpus(2, 1, visible="0,1") == ["0", "1"]
    assert local_node_gpus(2, 2, visible="3,2,1,0") == ["3,2", "1,0"]
    assert local_node_gpus(1, 2, visible="0,1") == [None]  # one node keeps the environment
    with pytest.raises(ExpectedFailure, match="need 4 GPUs, 2 are visible"):
        local_node_gpus(2, 2, visible="0,1")


def test_launches_at_once_are_handed_different_ports(tmp_path):
    """Launches that start together draw their rendezvous ports independently; four drawing the same random
    sequence (the same seed) are still handed four ports, and each port stays out of the draw while its launch
    starts: the registry, read and written under a lock, hands a port once in PORT_HOLD_S."""
    registry = tmp_path / "ports.json"
    draw = ("import random, sys; from pathlib import Path; random.seed(0); from llmpar.launch import free_port; "
            "print(free_port(Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", draw, str(registry)], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    ports = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert len(set(ports)) == 4 and all(p in launch.LOCAL_PORTS for p in ports)
    assert set(json.loads(registry.read_text())) == {str(p) for p in ports}


def test_a_port_is_handed_again_once_its_hold_has_passed(tmp_path, monkeypatch):
    registry = tmp_path / "ports.json"
    monkeypatch.setattr(launch.random, "sample", lambda ports, k: list(ports)[:k])  # always the same draw
    first = launch.free_port(registry)
    assert launch.free_port(registry) != first
    now = launch.time.time()
    monkeypatch.setattr(launch.time, "time", lambda: now + launch.PORT_HOLD_S + 1)
    assert launch.free_port(registry) == first
    registry.write_text("{not json")  # a damaged registry is started afresh
    assert launch.free_port(registry) == first


def test_mask_arguments_for_both_transformers_signatures():
    """create_causal_mask of transformers 5.24 (the CPU stack) and of 5.17 (the H200 study's)."""
    import torch

    from llmpar.model import mask_kwargs

    def mask_5_24(config, inputs_embeds, attention_mask, cache=None, position_ids=None, **kw):
        pass

    def mask_5_17(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None):
        pass

    h, pos = torch.zeros(1, 4, 8), torch.arange(4).unsqueeze(0)
    a = mask_kwargs(mask_5_24, "cfg", h, pos)
    assert set(a) == {"config", "inputs_embeds", "attention_mask", "cache", "position_ids"} and a["cache"] is None
    b = mask_kwargs(mask_5_17, "cfg", h, pos)
    assert set(b) == {"config", "input_embeds", "attention_mask", "cache_position", "past_key_values",
                      "position_ids"}
    assert b["input_embeds"] is h and b["cache_position"].tolist() == [0, 1, 2, 3]

    def mask_unknown(config, inputs_embeds, new_required_argument):
        pass

    with pytest.raises(TypeError, match="new_required_argument"):
        mask_kwargs(mask_unknown, "cfg", h, pos)


def _batch(tmp_path, names, cfg):
    prepared = prepare(cfg)
    jobs = [{"run_config": run_config(prepared, n), "out": str(tmp_path / n)} for n in names]
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(jobs))
    return path


@pytest.mark.slow
def test_runs_sharing_one_launch_each_match_single(tiny_tokens, baseline, tmp_path):
    """--batch: DDP and ZeRO-1 trained one after another by the same two workers; each run's losses and
    summary are its own (the second starts from the seed's weights, not the first run's)."""
    cfg = make_config({"ddp": {"strategy": "data_parallel", "gpus_per_node": 2},
                       "zero1": {"strategy": "zero", "zero_stage": 1, "gpus_per_node": 2}})
    path = _batch(tmp_path, ["ddp", "zero1"], cfg)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--batch", str(path),
                           "--tokens", str(tiny_tokens)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("launch (local node 0/1)") == 1  # one launch for both runs
    for name in ("ddp", "zero1"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        steps = [json.loads(x) for x in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
        assert summary["run"] == name and summary["status"] == "ok" and summary["world_size"] == 2
        assert_same_steps(steps, baseline[1], rtol=1e-4, min_steps=6)
        assert_same_first_update(summary, baseline[0], rtol=1e-4)


def test_batch_refuses_mixed_layouts(tiny_tokens, tmp_path):
    path = _batch(tmp_path, ["single", "ddp"], make_config({"ddp": {"strategy": "data_parallel",
                                                                     "gpus_per_node": 2}}))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--batch", str(path),
                           "--tokens", str(tiny_tokens)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "another process layout" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "single").exists()


def test_workers_share_the_jobs_threads():
    """4 workers on a 2-thread budget get 1 thread each, also in torch, which reads MKL_NUM_THREADS
    before OMP_NUM_THREADS: with 2 each, gloo runs of 4 workers on 2 cores were 13x slower."""
    from llmpar.launch import share_threads

    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    share_threads(env, 4)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "1"
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1", out.stderr[-2000:]
    wide = {"OMP_NUM_THREADS": "8"}
    share_threads(wide, 2)
    assert wide["OMP_NUM_THREADS"] == wide["MKL_NUM_THREADS"] == "4"


def test_record_invalid_writes_a_result_instead_of_failing(tiny_tokens, tmp_path):
    """--record-invalid (the workflow's flag): a layout that cannot fit becomes a summary with status
    'invalid' and the plan's prediction as its message, which aggregation takes as a row."""
    from llmpar.record import read_run

    out = tmp_path / "runs" / "big"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--strategy", "data_parallel", "--model_size", "1B",
         "--device", "cpu", "--tokens", str(tiny_tokens), "--out", str(out), "--record-invalid"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = read_run(out)["record"]
    assert record.status == "invalid" and "predicted peak memory" in record.message
    assert record.steps_completed == 0 and record.world_size == 2
