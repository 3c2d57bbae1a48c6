"""Before any process starts: what this machine has (CUDA devices, their name and memory) and whether it
can hold a run's layout (:func:`check_fits`, from the plan's predicted peak).

Device queries go to the driver (libcuda) and NVML directly, not through torch: importing torch costs
the launcher ~3 s per job, and a layout that does not fit is refused before that.
"""

from __future__ import annotations

import functools

from llmpar.errors import ConfigError, ExpectedFailure
from llmpar.kernels import FA4, FA4_DISTRIBUTION, QUACK_DISTRIBUTION, QUACK_MLPS, fa4_host_problem, quack_host_problem
from llmpar.metrics.env import package_version
from llmpar.plan import FIT_MARGIN, card_for_device, fits, predict


@functools.cache
def cuda_driver():
    """libcuda, initialised (``cuInit``); None without a driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    return lib if lib.cuInit(0) == 0 else None


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices visible to this process (CUDA_VISIBLE_DEVICES applies), asked of the driver
    (libcuda). 0 without a driver."""
    import ctypes

    lib, count = cuda_driver(), ctypes.c_int(0)
    if lib is None or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_capability() -> tuple[int, int] | None:
    """Compute capability (major, minor) of the first visible CUDA device, asked of the driver (libcuda);
    None without one."""
    import ctypes

    if cuda_device_count() == 0:
        return None
    lib = cuda_driver()
    device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
    if (lib.cuDeviceGet(ctypes.byref(device), 0) != 0 or lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device) != 0
            or lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) != 0):
        return None
    return major.value, minor.value


def check_kernels(rc: dict) -> None:
    """Raise ConfigError when the run asks for kernels this host cannot run (``train.attention`` fa4 or fa4-op:
    :func:`llmpar.kernels.fa4_host_problem`; ``mlp`` quack or quack-autotuned, ``norm`` quack:
    :func:`llmpar.kernels.quack_host_problem`), before any process starts."""
    attention = rc["train"]["attention"]
    quack = [f"{key} quack" for key, wanted in (("mlp", QUACK_MLPS), ("norm", ("quack",)))
             if rc["run"].get(key) in wanted]
    if attention not in FA4 and not quack:
        return
    capability = cuda_capability() if uses_cuda(rc) else None
    problems = []
    if attention in FA4:
        problems.append(fa4_host_problem(attention, capability, package_version(FA4_DISTRIBUTION)))
    problems += [quack_host_problem(what, capability, package_version(QUACK_DISTRIBUTION)) for what in quack]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"run {rc['run']['name']}: {'; '.join(problems)}")


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


def uses_cuda(rc: dict) -> bool:
    device = rc["train"]["device"]
    return device == "cuda" or (device == "auto" and cuda_device_count() > 0)


def check_fits(rc: dict, vocab_size: int, local_procs: int) -> None:
    """Raise ExpectedFailure('invalid') when this machine cannot hold the layout, before any process
    starts: the plan's predicted peak of the fullest rank (``llmpar.plan``) against 90 % of one GPU's
    memory, or on CPU the predicted bytes of all local processes against 90 % of the available host
    memory (the plan's CPU figure counts tensors only: no allocator or interpreter overhead)."""
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
        name, total = gpu_name_and_memory()
        if not total:
            return
        pred = predict(rc["model"], vocab_size, run, tc, card_for_device(name))
        need, avail = pred["peak_gib"], total / gib
        what = f"{name} memory per device"
    else:
        import psutil  # only here: the CPU check needs it, a GPU host need not have it

        pred = predict(rc["model"], vocab_size, run, {**tc, "device": "cpu"}, None)
        need, avail = pred["peak_gib"] * local_procs, psutil.virtual_memory().available / gib
        what = f"available host memory for {local_procs} processes"
    if not fits(need, avail):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in pred["memory_gib"].items() if v >= 0.05)
        raise ExpectedFailure(
            "invalid",
            f"predicted peak memory {need:.1f} GiB (rank {pred['peak_rank']}: {parts} GiB"
            f"{'' if use_cuda else f', x{local_procs} processes'}) exceeds {1 - FIT_MARGIN:.0%} of the "
            f"{avail:.1f} GiB of {what}; use a smaller micro_batch_size (or micro_batch_size: auto), "
            f"more processes for sharded strategies, or set train.memory_check: false",
        )
