"""What the slurm profile and rule `train` ask Slurm for, for every run of the 1B GPU preset.

No cluster needed: `snakemake --dry-run --profile slurm` lists each job's resources as Snakemake
resolves them (profile defaults + the rule's per-run request), and the executor plugin's own
submit-string builder (snakemake-executor-plugin-slurm 2.x) turns them into the sbatch flags.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from workflow_util import env as workflow_env

from llmpar.config import load_yaml, prepare

REPO = Path(__file__).resolve().parents[1]
PRESET = "configs/h200-1b.yaml"
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
PROFILE = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())

PRESET_RUNS = ("single", "pipeline-m4")  # each on one H200


def expected_request(cfg: dict, run: str) -> dict:
    """What a single-node run of a GPU study must ask for: its GPUs, and per GPU the CPUs and
    memory of `launch:`, for the run's runtime."""
    spec, launch = cfg["runs"][run], cfg["launch"]
    g = spec["gpus_per_node"]
    return {"nodes": spec["nodes"], "gpu": g, "cpus_per_task": g * launch["cpus_per_gpu"],
            "mem_mb": g * launch["mem_mb_per_gpu"], "runtime": spec["runtime_min"]}


def dry_run_resources(*configfiles: str) -> dict[str, dict]:
    """run -> resources of its train job in `snakemake --dry-run --profile slurm` (recorded=False: plan
    the training jobs instead of reusing the committed summaries)."""
    # --forcerun train: the committed summaries exist, so without it no training job would be planned
    cmd = [str(SNAKEMAKE), "--dry-run", "--nolock", "--profile", "slurm", "--forcerun", "train",
           "--config", "recorded=False",
           "--configfile", *configfiles]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=workflow_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    jobs, rule, run = {}, None, None
    for line in out.splitlines():
        if m := re.match(r"\s*(?:local)?rule (\S+):$", line):
            rule, run = m.group(1), None
        elif rule == "train" and (m := re.match(r"\s*wildcards: run=(\S+)$", line)):
            run = m.group(1)
        elif rule == "train" and run and (m := re.match(r"\s*resources: (.*)$", line)):
            pairs = (kv.split("=", 1) for kv in m.group(1).split(", "))
            jobs[run] = {k: int(v) if v.isdigit() else v for k, v in pairs}
    return jobs


class _Resources(dict):
    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc


def sbatch_flags(res: dict) -> list[str]:
    """The sbatch call the plugin builds for a job with these resources (less name, log, comment)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = SimpleNamespace(resources=_Resources(res), threads=1, name="train")
    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "workdir": None,
              "account": f" -A {res['slurm_account']}", "partition": f" -p {res['slurm_partition']}"}
    call = get_submit_command(job, params) + set_gres_string(job)
    return call.replace("--mem ", "--mem=").replace("-t ", "-t=").replace("-A ", "-A=").replace("-p ", "-p=").split()


@pytest.fixture(scope="module")
def preset_jobs():
    return dry_run_resources(PRESET)


@pytest.fixture(scope="module")
def preset_cfg():
    return prepare(load_yaml(REPO / PRESET))


def test_1b_preset_plans_exactly_its_runs(preset_jobs, preset_cfg):
    runs = preset_cfg["runs"]
    assert sorted(runs) == sorted(PRESET_RUNS)
    assert sorted(preset_jobs) == sorted(runs), (
        f"train jobs planned for --configfile {PRESET}: {sorted(preset_jobs)}; the preset's runs: "
        f"{sorted(runs)} (runs of the Snakefile's configfile merged in?)")


def test_1b_preset_single_node_gpu_requests(preset_jobs, preset_cfg):
    assert preset_cfg["launch"]["gpus"] is True
    defaults = PROFILE["default-resources"]
    for run in PRESET_RUNS:
        res, want = preset_jobs[run], expected_request(preset_cfg, run)
        assert want["nodes"] == want["gpu"] == 1, want  # the preset runs on one H200
        assert {k: res.get(k) for k in want} == want, (run, res)
        # partition and account come from the profile, never from the rules
        assert (res["slurm_partition"], res["slurm_account"]) == (defaults["slurm_partition"],
                                                                 defaults["slurm_account"])
        # one task on one node: no MPI launch, no task geometry
        assert not {"mpi", "tasks", "gres", "tasks_per_gpu"} & set(res), (run, res)
        flags = sbatch_flags(res)
        for flag in ("--nodes=1", "--gpus=1", f"--cpus-per-task={want['cpus_per_task']}",
                     f"--mem={want['mem_mb']}", f"-t={want['runtime']}",
                     f"-p={defaults['slurm_partition']}", f"-A={defaults['slurm_account']}"):
            assert flag in flags, (run, flag, flags)
        assert not any(f.startswith(("--ntasks", "--gres")) for f in flags), (run, flags)


def test_multi_node_request(tmp_path):
    """A two-node run of the same preset: nodes=2, tasks=2 and mpi set (the jobstep then runs the
    launcher in the batch step, which starts one torchrun per node through srun), GPUs per node."""
    overlay = tmp_path / "two-nodes.yaml"
    overlay.write_text(yaml.safe_dump(
        {"runs": {"hybrid-2n": {"strategy": "hybrid_parallel", "nodes": 2, "gpus_per_node": 8}}}))
    res = dry_run_resources(PRESET, str(overlay))["hybrid-2n"]
    launch = load_yaml(REPO / PRESET)["launch"]
    cpus, mem = 8 * launch["cpus_per_gpu"], 8 * launch["mem_mb_per_gpu"]
    want = {"nodes": 2, "tasks": 2, "mpi": "srun", "gres": "gpu:8", "cpus_per_task": cpus, "mem_mb": mem,
            "runtime": launch["runtime_min"]}
    assert {k: res.get(k) for k in want} == want, res
    assert "gpu" not in res, res  # --gpus is a job total; per node is --gres
    flags = sbatch_flags(res)
    for flag in ("--nodes=2", "--ntasks=2", "--gres=gpu:8", f"--cpus-per-task={cpus}", f"--mem={mem}",
                 f"-t={launch['runtime_min']}"):
        assert flag in flags, (flag, flags)
    assert not any(f.startswith(("--ntasks-per-gpu", "--gpus")) for f in flags), flags
