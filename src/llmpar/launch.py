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

import fcntl
import getpass
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from llmpar.errors import ExpectedFailure
from llmpar.io import read_appended_jsonl, write_json
from llmpar.metrics.definitions import dedupe_steps
from llmpar.paths import REPO_ROOT
from llmpar.preflight import cuda_device_count, uses_cuda
from llmpar.record import RunRecord, collect_failure, write_run

# --------------------------------------------------------------------------- launching


# Where a local launch's rendezvous port comes from: below Linux's ephemeral range (32768-60999), whose ports
# the system hands to outgoing connections (another launch's gloo connections, say), so that none takes the
# port between free_port's check and torchrun's bind; and apart from a Slurm launch's (20000-39999).
LOCAL_PORTS = range(10000, 20000)
# Launches on one host at once (a test suite's workers, several studies) draw their ports independently, and two
# that drew the same one would both find it free before either torchrun binds it: each port handed out is kept
# in a registry of this user's launches for PORT_HOLD_S, long past a torchrun's bind, and not handed out again.
PORT_HOLD_S = 300.0


def port_registry() -> Path:
    return Path(tempfile.gettempdir()) / f"llmpar-ports-{getpass.getuser()}.json"


def free_port(registry: Path | None = None) -> int:
    """A port of LOCAL_PORTS, drawn at random, that nothing listens on now (on any address, as torchrun's store
    binds) and that no launch of this user on this host was handed in the last PORT_HOLD_S seconds
    (``registry``, read and written under a lock)."""
    registry = registry or port_registry()
    with open(registry.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = time.time()
        try:
            handed = {int(p): t for p, t in json.loads(registry.read_text()).items() if now - t < PORT_HOLD_S}
        except (OSError, ValueError):  # none yet, or damaged: start afresh
            handed = {}
        for port in random.sample(LOCAL_PORTS, 200):
            if port in handed:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("", port))
                except OSError:
                    continue
            handed[port] = now
            write_json(registry, {str(p): t for p, t in handed.items()})
            return port
    raise RuntimeError(f"no free port in {LOCAL_PORTS.start}-{LOCAL_PORTS.stop - 1} after 200 tries")


def torchrun_cmd(nnodes: int, node_rank: int, nproc: int, master: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={nproc}",
        f"--master-addr={master}", f"--master-port={port}", "--max-restarts=0",
        "-m", "llmpar.train",
    ]


NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


JOB_FILE = ".job.json"  # in the first run's directory: what the workers train (shared across nodes)


def write_job(jobs: list[dict], tokens: Path, t0: float) -> Path:
    """The one encoding in which runs reach the workers: a JSON file listing each run's resolved config and
    output directory (several runs of one process layout share one launch), the token shards and the
    moment the run's wall clock started. Written in the first run's directory, which every node sees."""
    path = Path(jobs[0]["out"]) / JOB_FILE
    write_json(path, {"runs": jobs, "tokens": str(tokens), "t0": t0})
    return path


def worker_env(rc: dict, job: Path) -> dict:
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["LLMPAR_JOB"] = str(job)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Keep NVLink multicast off (a program that uses it can take a shared host's GPUs out of service),
    # and give DeepSpeed the device the run trains on.
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


def launch(jobs: list[dict], tokens: Path, argv: list[str], t0: float) -> int:
    """Start the workers for ``jobs`` (``{"run_config", "out"}`` each, one process layout: the first's); returns
    the exit code of the slowest agent (0 when all succeeded). ``t0``: when the first run's wall clock started.
    An srun task of a multi-node job reuses the job file its batch step wrote."""
    rc = jobs[0]["run_config"]
    run = rc["run"]
    nodes, gpn = run["nodes"], run["gpus_per_node"]
    job = Path(os.environ["LLMPAR_JOB"]) if os.environ.get("LLMPAR_SRUN_TASK") else write_job(jobs, tokens, t0)
    env = worker_env(rc, job)
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
        return run_agents([(cmd, env)])
    share_threads(env, nodes * gpn)  # all (local) nodes' workers run on this host
    port = free_port()
    gpus = local_node_gpus(nodes, gpn) if uses_cuda(rc) else [None] * nodes
    agents = []
    for node_rank in range(nodes):
        cmd = torchrun_cmd(nodes, node_rank, gpn, "127.0.0.1", port)
        node_env = env if gpus[node_rank] is None else {**env, "CUDA_VISIBLE_DEVICES": gpus[node_rank]}
        where = "" if gpus[node_rank] is None else f", GPUs {gpus[node_rank]}"
        print(f"launch (local node {node_rank}/{nodes}{where}):", shlex.join(cmd), flush=True)
        agents.append((cmd, node_env))
    return run_agents(agents)


STOP_GRACE_S = 30.0  # after forwarding SIGTERM, how long the agents get before SIGKILL


def run_agents(agents: list[tuple[list[str], dict]], grace_s: float = STOP_GRACE_S) -> int:
    """Run torchrun agents (command, environment) to their end; returns the exit code of the slowest (0 when
    all succeeded).

    Each agent runs in its own process group, so that a stop reaches exactly it and its workers: on SIGINT or
    SIGTERM this process forwards SIGTERM to every agent's group (torchrun then stops its workers, which
    run in groups of their own), waits for them, SIGKILLs a group still alive after ``grace_s``, and returns
    128 + the signal's number. What a stopped run leaves is never taken as a result: no summary, a
    checkpoint only if it was complete, progress rows a resume reads back."""
    procs: list[subprocess.Popen] = []
    stopped: list[int] = []

    def forward(signum, frame):
        if not stopped:
            print(f"launch: {signal.Signals(signum).name}: stopping the training processes", flush=True)
        stopped.append(signum)
        _signal_groups(procs, signal.SIGTERM)

    # (only the main thread may install signal handlers; elsewhere a stop is the caller's to handle)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        for cmd, env in agents:
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        if stopped:  # a stop that came while the agents were starting
            _signal_groups(procs, signal.SIGTERM)
        deadline = None
        while any(p.poll() is None for p in procs):
            if stopped and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                _signal_groups(procs, signal.SIGKILL)
                deadline = math.inf
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        return 128 + stopped[0]
    return max((p.returncode for p in procs), key=abs)


def _signal_groups(procs: list[subprocess.Popen], sig: signal.Signals) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


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


def failure_record(rc: dict, out: Path, status: str, message: str) -> None:
    """A complete record for a run that ended in an expected failure (no steps, or the steps so far)."""
    steps = steps_so_far(out / "progress.jsonl")
    write_run(out, RunRecord.failure(rc, status, message, steps), steps, [], [])


def steps_so_far(progress: Path) -> list[dict]:
    """The step records a failed run logged before it stopped: its last configuration's, one per step
    (the newest attempt's where a restart repeated steps)."""
    rows = [r for r in read_appended_jsonl(progress) if r.get("kind") == "step"]
    if not rows:
        return []
    last_hash = rows[-1].get("config_hash")
    steps, _ = dedupe_steps([{k: v for k, v in r.items() if k not in ("kind", "config_hash")}
                             for r in rows if r.get("config_hash") == last_hash])
    return steps


def finish(rc: dict, out: Path, code: int) -> int:
    """After the workers exit: an expected failure becomes the run's record; anything else is an error."""
    failure = collect_failure(out)
    if failure and failure["status"] in ("oom", "diverged", "invalid"):
        failure_record(rc, out, failure["status"], failure["message"])
        print(f"[{rc['run']['name']}] {failure['status']}: {failure['message']}", flush=True)
        return 0
    if code > 128 and code - 128 in (signal.SIGINT, signal.SIGTERM):
        print(f"[{rc['run']['name']}] stopped by {signal.Signals(code - 128).name}: no summary written; a rerun "
              "resumes from the newest complete checkpoint", file=sys.stderr, flush=True)
        return code
    if code != 0:
        print(f"error: training failed with exit code {code} (see the traceback above)", file=sys.stderr)
        return code if code > 0 else 1
    if not (out / "summary.json").is_file():
        print(f"error: workers exited 0 but wrote no summary for {rc['run']['name']}", file=sys.stderr)
        return 1
    return 0
