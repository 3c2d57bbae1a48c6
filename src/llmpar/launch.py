"""`scripts/train.py`: validate a run, check it fits, and start its torchrun workers.

Three ways in, one code path out (torchrun with explicit node ranks and a master on the first node):

* plain ``python scripts/train.py ...`` on one machine: starts ``nodes`` local torchrun agents (one
  per "node", node ranks 0..N-1, master 127.0.0.1 on a free port) with ``gpus_per_node`` workers each;
* inside a Slurm allocation of N > 1 nodes (the workflow's multi-node jobs): re-launches itself
  through ``srun`` with one task per node, and each task starts one torchrun agent whose node rank
  is ``SLURM_NODEID`` and whose master is the allocation's first host (``scontrol show hostnames``);
* under torchrun already (``LOCAL_RANK`` set): runs the worker directly.

Expected failures (out of memory, divergence, a layout the hardware cannot hold) become a run
summary with that status; bad input exits 2 with a message before anything is written.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from llmpar.config import REPO_ROOT, load_schema, load_yaml, prepare, run_config
from llmpar.errors import ConfigError, ExpectedFailure, UserError
from llmpar.io import read_appended_jsonl, write_json, write_jsonl

# The CLI's flags are the schema's keys (choices, types and help from schemas/config.schema.yaml).
# the run keys a one-run CLI has no use for (tests' faults, Slurm time, a lever the default gets right)
CLI_SKIPPED_RUN_KEYS = ("fault", "runtime_min", "reshard_after_forward")
# study settings the CLI can set: flag -> (section, key)
CLI_STUDY_FLAGS = {"model_size": ("model", "size"), "seq_len": ("model", "seq_len"), "steps": ("train", "steps"),
                   "global_batch": ("train", "global_batch"), "lr": ("train", "lr"), "device": ("train", "device")}


def _schema_flag(p: argparse.ArgumentParser, flag: str, prop: dict) -> None:
    """One flag from a schema property: its enum as choices, its type, its description as the help."""
    help_text = prop.get("description")
    if "enum" in prop:
        p.add_argument(f"--{flag}", choices=prop["enum"], help=help_text)
    elif prop.get("type") == "boolean":
        p.add_argument(f"--{flag}", action="store_true", default=None, help=help_text)
    elif prop.get("type") == "number":
        p.add_argument(f"--{flag}", type=float, help=help_text)
    else:  # integers, and sizes a study may sweep ($defs/ints): one integer on the CLI
        p.add_argument(f"--{flag}", type=int, help=help_text)


def cli_run_keys() -> list[str]:
    run = load_schema()["properties"]["runs"]["additionalProperties"]["properties"]
    return [k for k in run if k not in CLI_SKIPPED_RUN_KEYS]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/train.py",
        description="Train one run of the parallelism study (starts its own torchrun workers).",
    )
    schema = load_schema()["properties"]
    run = schema["runs"]["additionalProperties"]["properties"]
    for key in cli_run_keys():
        _schema_flag(p, key, run[key])
    for flag, (section, key) in CLI_STUDY_FLAGS.items():
        _schema_flag(p, flag, schema[section]["properties"][key])
    _schema_flag(p, "seed", schema["seed"])
    p.add_argument("--config", help="study config to take data/model/train settings (and --run) from")
    p.add_argument("--run", help="name of a run in --config")
    p.add_argument("--run-config", dest="run_config", help="resolved run config as JSON (used by the workflow)")
    p.add_argument("--tokens", help="token-shard directory (default: build the synthetic corpus for the CLI)")
    p.add_argument("--out", help="run directory (default: results/cli/runs/<run>)")
    p.add_argument("--batch", help="JSON file listing runs ({'run_config': ..., 'out': ...}) that share one launch: "
                                    "the workers train them one after another (same process layout; used by the "
                                    "GPU test suite to pay process and NCCL start-up once)")
    p.add_argument("--record-invalid", action="store_true",
                   help="write a summary with status 'invalid' (instead of exiting 2) when the hardware "
                        "cannot hold the layout; the workflow uses this so a study records it as a result")
    return p.parse_args(argv)


def _cli_config(args) -> tuple[dict, str]:
    """A one-run study config from --config and/or the CLI flags. Returns (prepared config, run name)."""
    raw = load_yaml(args.config) if args.config else {}
    if args.run:
        if not args.config:
            raise ConfigError("--run needs --config")
        if args.run not in raw.get("runs", {}):
            raise ConfigError(f"--run: '{args.run}' is not a run in {args.config}")
        entry = dict(raw["runs"][args.run])
    else:
        if not args.strategy:
            raise ConfigError("--strategy is required (or --config with --run)")
        entry = {}
    for key in cli_run_keys():
        if getattr(args, key, None) is not None:
            entry[key] = getattr(args, key)
    name = args.run or entry["strategy"]
    raw["runs"], raw["baseline"] = {name: entry}, name
    raw.setdefault("study", "cli")
    for flag, (section, key) in CLI_STUDY_FLAGS.items():
        if getattr(args, flag, None) is not None:
            raw.setdefault(section, {})[key] = getattr(args, flag)
    if args.seed is not None:
        raw["seed"] = args.seed
    device_pref = raw.get("train", {}).get("device", "auto")
    gpus = cuda_device_count() if device_pref != "cpu" else 0
    cfg = prepare(raw, default_procs=gpus or 2)
    runs = list(cfg["runs"])
    if len(runs) != 1:
        raise ConfigError(f"the CLI trains one run; the flags expand into {len(runs)}: {runs}")
    return cfg, runs[0]


def _ensure_cli_data(cfg: dict) -> Path:
    """Build corpus, tokenizer and token shards for a CLI run (cached by a hash of the data settings)."""
    from llmpar.config import stable_hash
    from llmpar.data.corpus import build_corpus
    from llmpar.data.tokenize import build_shards, build_tokenizer

    key = stable_hash({"data": cfg["data"], "tokenizer": cfg["tokenizer"], "seed": cfg["seed"]})
    root = REPO_ROOT / "results" / "cli" / "data" / key
    tokens = root / "tokens"
    if not (tokens / "meta.json").is_file():
        print(f"building CLI data in {root}", flush=True)
        build_corpus(cfg["data"], cfg["seed"], root / "corpus")
        build_tokenizer(cfg["tokenizer"], root / "corpus" / "train.txt", root / "tokenizer" / "tokenizer.json")
        build_shards(root / "tokenizer" / "tokenizer.json", root / "corpus", tokens)
    return tokens


# --------------------------------------------------------------------------- fit checks


def check_fits(rc: dict, vocab_size: int, local_procs: int) -> None:
    """Raise ExpectedFailure('invalid') when this machine cannot hold the layout, before any process
    starts: the plan's predicted peak of the fullest rank (``llmpar.plan``) against 90 % of one GPU's
    memory, or on CPU the predicted bytes of all local processes against 90 % of the available host
    memory (the plan's CPU figure counts tensors only: no allocator or interpreter overhead)."""
    from llmpar import plan

    run, tc = rc["run"], rc["train"]
    use_cuda = uses_cuda(rc)
    gpus = cuda_device_count() if use_cuda else 0
    if use_cuda and gpus < local_procs:
        what = (f"{run['gpus_per_node']} GPUs per node" if local_procs == run["gpus_per_node"] else
                f"{local_procs} GPUs on this machine ({run['nodes']} local nodes x {run['gpus_per_node']})")
        raise ExpectedFailure("invalid", f"the layout needs {what}, this node has {gpus}")
    if not tc["memory_check"]:
        return
    gib = 2**30
    if use_cuda:
        name, total = _gpu_name_and_memory()
        if not total:
            return
        card = plan.card_for_device(name)
        pred = plan.predict(rc["model"], vocab_size, run, tc, card)
        need, avail = pred["peak_gib"], total / gib
        what = f"{name} memory per device"
    else:
        import psutil  # only here: the CPU check needs it, a GPU image need not have it

        pred = plan.predict(rc["model"], vocab_size, run, {**tc, "device": "cpu"}, None)
        need, avail = pred["peak_gib"] * local_procs, psutil.virtual_memory().available / gib
        what = f"available host memory for {local_procs} processes"
    if not plan.fits(need, avail):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in pred["memory_gib"].items() if v >= 0.05)
        raise ExpectedFailure(
            "invalid",
            f"predicted peak memory {need:.1f} GiB (rank {pred['peak_rank']}: {parts} GiB"
            f"{'' if use_cuda else f', x{local_procs} processes'}) exceeds {1 - plan.FIT_MARGIN:.0%} of the "
            f"{avail:.1f} GiB of {what}; use a smaller micro_batch_size (or micro_batch_size: auto), "
            f"more processes for sharded strategies, or set train.memory_check: false",
        )


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


def _gpu_name_and_memory() -> tuple[str | None, int | None]:
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


def main_batch(args, argv: list[str]) -> int:
    """``--batch``: several runs of one process layout in one launch (see ``llmpar.train.worker_main``)."""
    from llmpar.data.tokenize import read_meta

    jobs = json.loads(Path(args.batch).read_text())
    if not jobs or not args.tokens:
        raise ConfigError("--batch needs a non-empty list of runs and --tokens")
    tokens = Path(args.tokens)
    vocab = read_meta(tokens)["vocab_size"]
    first = jobs[0]["run_config"]
    layout = ("nodes", "gpus_per_node")
    for job in jobs:
        rc = job["run_config"]
        if [rc["run"][k] for k in layout] != [first["run"][k] for k in layout] or \
                rc["train"]["device"] != first["train"]["device"]:
            raise ConfigError(f"--batch: run {rc['run']['name']} has another process layout or device than "
                              f"{first['run']['name']}; a batch shares one launch")
        check_fits(rc, vocab, rc["run"]["gpus_per_node"] * rc["run"]["nodes"])
    for job in jobs:
        Path(job["out"]).mkdir(parents=True, exist_ok=True)
        (Path(job["out"]) / "summary.json").unlink(missing_ok=True)
    code = launch(first, tokens, None, [str(REPO_ROOT / "scripts" / "train.py"), *argv], batch=Path(args.batch))
    results = [finish(job["run_config"], Path(job["out"]), code) for job in jobs]
    return max(results, key=abs)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("LLMPAR_T0", repr(time.time()))  # process start: wall time counts from here
    if "LOCAL_RANK" in os.environ:  # started by torchrun: be the worker
        from llmpar.train import worker_main

        return worker_main()
    args = parse_args(argv)
    if args.batch:
        try:
            return main_batch(args, argv)
        except (UserError, ExpectedFailure) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
    script = str(Path(sys.argv[0]).resolve()) if sys.argv and sys.argv[0].endswith(".py") else None
    try:
        if args.run_config:
            rc = json.loads(args.run_config)
            cfg = None
        else:
            cfg, name = _cli_config(args)
            rc = run_config(cfg, name)
        if not args.out and cfg is None:
            raise ConfigError("--out is required with --run-config")
        out = Path(args.out) if args.out else REPO_ROOT / "results" / "cli" / "runs" / rc["run"]["name"]
        if args.tokens:
            tokens = Path(args.tokens)
        elif cfg is not None:
            tokens = _ensure_cli_data(cfg)
        else:
            raise ConfigError("--tokens is required with --run-config")
        from llmpar.data.tokenize import read_meta

        vocab = read_meta(tokens)["vocab_size"]
        local_procs = run_gpn = rc["run"]["gpus_per_node"]
        if not os.environ.get("LLMPAR_SRUN_TASK") and slurm_nodes() < rc["run"]["nodes"]:
            local_procs = run_gpn * rc["run"]["nodes"]  # all "nodes" share this machine
        try:
            check_fits(rc, vocab, local_procs)
        except ExpectedFailure as exc:
            if not args.record_invalid:
                raise
            failure_summary(rc, out, exc.status, exc.message)
            print(f"[{rc['run']['name']}] invalid: {exc.message}", flush=True)
            return 0
    except (UserError, ExpectedFailure) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    self_argv = [script or str(REPO_ROOT / "scripts" / "train.py"), *argv]
    code = launch(rc, tokens, out, self_argv)
    if os.environ.get("LLMPAR_SRUN_TASK"):
        return code  # the batch step collects failures
    return finish(rc, out, code)
