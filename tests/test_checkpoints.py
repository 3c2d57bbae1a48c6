"""Which checkpoint a run resumes: only one of the same configuration (every key that changes the training
is in the config hash), and only an intact one (its files as their sizes and checksums were recorded when
it was written); a damaged one is reported and skipped for the next older intact one, or the run starts
afresh. In-process, on a one-rank gloo group and an engine that writes and reads plain files."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import make_config

from llmpar.checkpoint import Checkpoints, damage
from llmpar.config import load_schema, prepare, run_config
from llmpar.layout import RunSpec
from llmpar.train import config_hash_of

DATA_META = {"dtype": "uint16", "eos_id": 0, "source_sha256": "77a2", "tokenizer_sha256": "99d7",
             "tokens": {"train": 42088, "val": 2219}, "vocab_size": 300}


def training_config() -> dict:
    return run_config(prepare(make_config({"ddp": {"strategy": "data_parallel", "gpus_per_node": 2}})), "ddp")


def changed(value):
    """Another value of the same kind (what a user's edit of that key makes)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, list):
        return [*value, 1]
    if isinstance(value, dict):
        return {**value, "changed": 1}
    return "changed"  # None


def test_every_key_that_changes_the_training_changes_the_config_hash():
    """Each key of the schema's train and model sections, each field of the resolved run (layout and
    levers) and each run key the schema allows, the seed and each field of the data's metadata: changing
    any one changes the hash a checkpoint must match, so a changed run never resumes the old run's state.
    The keys come from the schema and RunSpec, so a key added later is covered too."""
    rc, base = training_config(), config_hash_of(training_config(), DATA_META)
    schema = load_schema()["properties"]
    run_keys = [f.name for f in dataclasses.fields(RunSpec)]
    run_keys += [k for k in schema["runs"]["additionalProperties"]["properties"] if k not in run_keys]
    paths = [("train", k) for k in schema["train"]["properties"]] + \
        [("model", k) for k in schema["model"]["properties"]] + [("run", k) for k in run_keys] + [("seed",)]
    assert {("train", "lr"), ("model", "size"), ("run", "tp"), ("run", "precision"), ("seed",)} <= set(paths)
    unchanged = []
    for path in paths:
        cfg = copy.deepcopy(rc)
        where = cfg
        for key in path[:-1]:
            where = where[key]
        where[path[-1]] = changed(where.get(path[-1]))
        if config_hash_of(cfg, DATA_META) == base:
            unchanged.append(".".join(path))
    for key in DATA_META:
        if config_hash_of(rc, {**DATA_META, key: changed(DATA_META[key])}) == base:
            unchanged.append(f"data.{key}")
    assert not unchanged, f"keys that change the training but not the config hash: {unchanged}"
    # what only places or names the run: Slurm resources and the study's name (a resubmission resumes)
    for section, key in (("launch", "runtime_min"), ("launch", "cpus_per_gpu"), ("study", None)):
        cfg = copy.deepcopy(rc)
        if key is None:
            cfg[section] = changed(cfg[section])
        else:
            cfg[section][key] = changed(cfg[section][key])
        assert config_hash_of(cfg, DATA_META) == base, (section, key)


# --------------------------------------------------------------------------- resuming on one rank


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo process group (Checkpoints.save synchronises its ranks)."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class FileEngine:
    """An engine whose state is one number, saved as a shard file and an index (as DCP writes them)."""

    def __init__(self, state: int = 0):
        self.state = state

    def save_checkpoint(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "__0_0.distcp").write_bytes(bytes([self.state % 256]) * 4096)
        (path / ".metadata").write_text(json.dumps({"shards": 1}))

    def load_checkpoint(self, path: Path) -> None:
        self.state = (path / "__0_0.distcp").read_bytes()[0]


def saved(tmp_path: Path, steps: list[int], config_hash: str = "a", keep: int = 3) -> Checkpoints:
    ckpts = Checkpoints(tmp_path / "checkpoints", config_hash, rank=0, keep=keep)
    for step in steps:
        ckpts.save(FileEngine(step), step, attempt=0, elapsed_s=float(step))
    return ckpts


def test_a_checkpoint_records_its_files_and_resumes_when_intact(one_rank, tmp_path):
    ckpts = saved(tmp_path, [3, 6])
    path, meta = ckpts.newest_intact(pytest.fail)
    assert path.name == "step_00000006" and meta["step"] == 6
    assert sorted(meta["files"]) == ["engine/.metadata", "engine/__0_0.distcp", "rng_rank0.pt"]
    assert meta["files"]["engine/__0_0.distcp"][0] == 4096
    engine = FileEngine()
    ckpts.load(engine, path)
    assert engine.state == 6


def test_a_changed_configuration_resumes_nothing(one_rank, tmp_path):
    """A checkpoint of another config hash (the run with its lr changed, say) is never a candidate."""
    rc = training_config()
    saved(tmp_path, [3], config_hash=config_hash_of(rc, DATA_META))
    rc["train"]["lr"] = changed(rc["train"]["lr"])
    other = Checkpoints(tmp_path / "checkpoints", config_hash_of(rc, DATA_META), rank=0, keep=3)
    assert other.complete() == [] and other.newest_intact(pytest.fail) is None


def damage_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["halved", "flipped", "missing"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(one_rank, tmp_path, how):
    ckpts = saved(tmp_path, [3, 6])
    shard = ckpts.root / "step_00000006" / "engine" / "__0_0.distcp"
    if how == "halved":
        damage_half(shard)
    elif how == "flipped":  # same size, other bytes
        shard.write_bytes(b"\x01" + shard.read_bytes()[1:])
    else:
        shard.unlink()
    reports = []
    path, meta = ckpts.newest_intact(reports.append)
    assert path.name == "step_00000003" and meta["step"] == 3
    reason = {"halved": "has 2048 bytes, 4096 when it was written",
              "flipped": "does not have the SHA-256 it was written with", "missing": "is missing"}[how]
    assert reports == [f"checkpoint step_00000006 is damaged (engine/__0_0.distcp {reason}): not resumed, removed",
                       "resuming from the newest intact checkpoint, step_00000003"]
    assert not (ckpts.root / "step_00000006").exists()  # not tried again by a later attempt


def test_no_intact_checkpoint_starts_afresh_and_says_why(one_rank, tmp_path):
    ckpts = saved(tmp_path, [3, 6])
    for step in (3, 6):
        damage_half(ckpts.root / f"step_{step:08d}" / "rng_rank0.pt")
    meta = json.loads((ckpts.root / "step_00000003" / "meta.json").read_text())
    del meta["files"]
    (ckpts.root / "step_00000003" / "meta.json").write_text(json.dumps(meta))
    reports = []
    assert ckpts.newest_intact(reports.append) is None
    assert reports[0].startswith("checkpoint step_00000006 is damaged (rng_rank0.pt has ")
    assert reports[1] == ("checkpoint step_00000003 is damaged (its meta.json records no file sizes and checksums, "
                          "so it cannot be verified): not resumed, removed")
    assert reports[2] == "no intact checkpoint of this configuration is left: the run starts afresh"
    assert ckpts.complete() == []


def test_damage_names_nothing_for_an_intact_checkpoint(one_rank, tmp_path):
    ckpts = saved(tmp_path, [3])
    path = ckpts.complete()[0]
    assert damage(path, json.loads((path / "meta.json").read_text())) is None
