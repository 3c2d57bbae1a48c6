"""Start a run's torchrun workers (after :mod:`llmpar.run_cli` has validated it and checked it fits),
and turn what they leave into the run's result.

Three ways in, one code path out (torchrun with explicit node ranks and a master on the first node):

* plain ``python scripts/train.py ...`` on one machine: starts ``nodes`` local torchrun agents (one
  per "node", node ranks 0..N-1, master 127.0.0.1 on a free port) with ``gpus_per_node`` workers each;
* inside a Slurm allocation of N > 1 nodes (the workflow's multi-node jobs): re-launches itself
  through ``srun`` with one task per node, and each task starts one torchrun agent whose node rank
  is ``SLURM_NODEID`` and whose master is the allocation's first host (``scontrol show hostnames``);
* under torchrun already (``LOCAL_RANK`` set): runs the worker directly.

Expected failures (out of memory, divergence) become a run summary with that status
(:func:`finish`).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from llmpar.config import REPO_ROOT
from llmpar.errors import ExpectedFailure
from llmpar.io import read_appended_jsonl, write_json, write_jsonl

# --------------------------------------------------------------------------- devices


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices visible to this process (CUDA_VISIBLE_DEVICES applies), asked of the driver
    (libcuda) instead of torch: importing torch costs the launcher ~3 s per job. 0 without a driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def gpu_name_and_memory() -> tuple[str | None, int | None]:
    """Name and total memory (bytes) of the first visible GPU, from NVML ((None, None) without it)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        return (name.decode() if isinstance(name, bytes) else name), pynvml.nvmlDeviceGetMemoryInfo(handle).total
    except Exception:
        return None, None


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nnodes: int, node_rank: int, nproc: int, master: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={nproc}",
        f"--master-addr={master}", f"--master-port={port}", "--max-restarts=0",
        "-m", "llmpar.train",
    ]


NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def worker_env(rc: dict, tokens: Path, out: Path | None) -> dict:
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if out is not None:
        env["LLMPAR_RUN_CONFIG"] = json.dumps(rc)
        env["LLMPAR_OUT"] = str(out)
    env["LLMPAR_TOKENS"] = str(tokens)
    env.setdefault("LLMPAR_T0", repr(time.time()))
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Keep NVLink multicast off (the lent GPU machines require it: it can take a shared host's GPUs out
    # of service), and give DeepSpeed the device the run trains on.
    for var, value in NO_MULTICAST.items():
        env.setdefault(var, value)
    env["DS_ACCELERATOR"] = "cuda" if uses_cuda(rc) else "cpu"
    return env


def _scontrol_fields(*args: str) -> dict:
    """``scontrol show <args> -o`` as a dict of its key=value fields ({} when scontrol fails)."""
    try:
        out = subprocess.run(["scontrol", "show", *args, "-o"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f) if out.returncode == 0 else {}


def slurm_job() -> dict:
    """This Slurm job's NumNodes, NodeList and CPUs/Task ({} outside a job). From the environment, or
    from scontrol when only SLURM_JOB_ID is there: snakemake-executor-plugin-slurm's jobstep removes
    the other SLURM_* variables before it runs a rule's shell command."""
    job_id = os.environ.get("SLURM_JOB_ID")
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not job_id:
        return {}
    if nodes and nodelist:
        return {"NumNodes": nodes, "NodeList": nodelist, "CPUs/Task": os.environ.get("SLURM_CPUS_PER_TASK")}
    return _scontrol_fields("job", job_id)


def slurm_nodes() -> int:
    try:
        return int(slurm_job().get("NumNodes") or 0)
    except ValueError:  # a pending job's range such as "2-4"
        return 0


def slurm_first_host() -> str:
    """Address of the allocation's first node: its NodeAddr (what Slurm itself connects to; differs
    from the node name where names are not host names), else the name."""
    nodelist = slurm_job()["NodeList"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    first = out.stdout.split()[0]
    return _scontrol_fields("node", first).get("NodeAddr") or first


def share_threads(env: dict, procs_here: int) -> None:
    """Give each worker process an equal share of the job's CPU threads.

    ``OMP_NUM_THREADS`` in the launcher's environment is the job's budget (Snakemake sets it, and the
    BLAS variables below, to the rule's ``threads``; else every core). torch takes its intra-op
    thread count from ``MKL_NUM_THREADS`` over ``OMP_NUM_THREADS``, so both are set: with 4 workers on
    2 cores each keeping 2 threads, gloo runs were measured 13x slower than with 1 thread each.
    """
    budget = int(env.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
    share = str(max(1, budget // procs_here))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = share


def launch(rc: dict, tokens: Path, out: Path | None, argv: list[str], batch: Path | None = None) -> int:
    """Start the workers; returns the exit code of the slowest agent (0 when all succeeded). With
    ``batch`` (``out`` None) the workers train every run listed there; ``rc`` is the first of them."""
    run = rc["run"]
    nodes, gpn = run["nodes"], run["gpus_per_node"]
    env = worker_env(rc, tokens, out)
    if batch is not None:
        env["LLMPAR_BATCH"] = str(batch)
    if nodes > 1 and slurm_nodes() >= nodes and not os.environ.get("LLMPAR_SRUN_TASK"):
        # Batch step of a multi-node Slurm job: one task per node, each re-entering this launcher.
        env["LLMPAR_SRUN_TASK"] = "1"
        cpus = slurm_job().get("CPUs/Task")  # srun of Slurm 22.05 does not inherit sbatch's -c
        cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
               *([f"--cpus-per-task={cpus}"] if cpus and cpus.isdigit() else []), sys.executable, *argv]
        print("launch:", shlex.join(cmd), flush=True)
        return subprocess.run(cmd, env=env).returncode
    if os.environ.get("LLMPAR_SRUN_TASK"):
        share_threads(env, gpn)
        node_rank = int(os.environ["SLURM_NODEID"])
        port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
        cmd = torchrun_cmd(nodes, node_rank, gpn, slurm_first_host(), port)
        print(f"launch (node {node_rank}):", shlex.join(cmd), flush=True)
        return subprocess.run(cmd, env=env).returncode
    share_threads(env, nodes * gpn)  # all (local) nodes' workers run on this host
    port = free_port()
    gpus = local_node_gpus(nodes, gpn) if uses_cuda(rc) else [None] * nodes
    procs = []
    for node_rank in range(nodes):
        cmd = torchrun_cmd(nodes, node_rank, gpn, "127.0.0.1", port)
        node_env = env if gpus[node_rank] is None else {**env, "CUDA_VISIBLE_DEVICES": gpus[node_rank]}
        where = "" if gpus[node_rank] is None else f", GPUs {gpus[node_rank]}"
        print(f"launch (local node {node_rank}/{nodes}{where}):", shlex.join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd, env=node_env, start_new_session=False))
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def uses_cuda(rc: dict) -> bool:
    device = rc["train"]["device"]
    return device == "cuda" or (device == "auto" and cuda_device_count() > 0)


def local_node_gpus(nodes: int, gpus_per_node: int, visible: str | None = None) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` for each of ``nodes`` local torchrun agents: node i gets the i-th block of
    ``gpus_per_node`` of the GPUs visible here, as a real node of a cluster has its own GPUs. Without
    it every agent's local rank 0 takes cuda:0 and NCCL stops with "Duplicate GPU detected". One node
    keeps the environment as it is (``[None]``)."""
    if nodes == 1:
        return [None]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible else \
        [str(i) for i in range(cuda_device_count())]
    if len(ids) < nodes * gpus_per_node:
        raise ExpectedFailure("invalid", f"{nodes} local nodes x {gpus_per_node} GPUs need {nodes * gpus_per_node} "
                                         f"GPUs, {len(ids)} are visible")
    return [",".join(ids[i * gpus_per_node:(i + 1) * gpus_per_node]) for i in range(nodes)]


def failure_summary(rc: dict, out: Path, status: str, message: str) -> None:
    """A complete summary for a run that ended in an expected failure (no steps, or the steps so far)."""
    run = rc["run"]
    steps = steps_so_far(out / "progress.jsonl")
    summary = {
        "run": run["name"], "status": status, "message": message, "spec": run, "strategy": run["strategy"],
        "world_size": run["nodes"] * run["gpus_per_node"], "nodes": run["nodes"],
        "gpus_per_node": run["gpus_per_node"], "steps_completed": len(steps), "steps_planned": rc["train"]["steps"],
    }
    write_jsonl(out / "steps.jsonl", steps)
    write_json(out / "summary.json", summary)


def steps_so_far(progress: Path) -> list[dict]:
    """The step records a failed run logged before it stopped: its last configuration's, one per step
    (the newest attempt's where a restart repeated steps)."""
    from llmpar.metrics.definitions import dedupe_steps

    rows = [r for r in read_appended_jsonl(progress) if r.get("kind") == "step"]
    if not rows:
        return []
    last_hash = rows[-1].get("config_hash")
    steps, _ = dedupe_steps([{k: v for k, v in r.items() if k not in ("kind", "config_hash")}
                             for r in rows if r.get("config_hash") == last_hash])
    return steps


def collect_failures(out: Path) -> dict | None:
    files = sorted(out.glob(".failure-rank*.json"))
    if not files:
        return None
    failures = [json.loads(f.read_text()) for f in files]
    for f in files:
        f.unlink()
    first = failures[0]
    return {"status": first["status"], "message": f"rank {first['rank']}: {first['message']}"}


def finish(rc: dict, out: Path, code: int) -> int:
    """After the workers exit: an expected failure becomes the run's summary; anything else is an error."""
    failure = collect_failures(out)
    if failure and failure["status"] in ("oom", "diverged", "invalid"):
        failure_summary(rc, out, failure["status"], failure["message"])
        print(f"[{rc['run']['name']}] {failure['status']}: {failure['message']}", flush=True)
        return 0
    if code != 0:
        print(f"error: training failed with exit code {code} (see the traceback above)", file=sys.stderr)
        return code if code > 0 else 1
    if not (out / "summary.json").is_file():
        print(f"error: workers exited 0 but wrote no summary for {rc['run']['name']}", file=sys.stderr)
        return 1
    return 0


