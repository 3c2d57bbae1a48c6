#!/usr/bin/env python
"""Bus bandwidth of an all-reduce between the processes of one host (NCCL through torch.distributed, one
process a GPU), as nccl-tests reports it: 2 (n - 1) / n x bytes / time per all-reduce. The plan's
``link_busbw_gbps`` (src/llmpar/cards.yaml) is this at 1 GiB.

    torchrun --nproc-per-node 2 benchmarks/allreduce_busbw.py --mib 1024
    torchrun --nproc-per-node 2 benchmarks/allreduce_busbw.py --mib 4 --backend gloo      # on a CPU
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=1024, help="all-reduce size, MiB of fp32")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20, help="timed all-reduces")
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    a = p.parse_args()
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group(a.backend)
    rank, n = dist.get_rank(), dist.get_world_size()
    device = "cpu"
    if a.backend == "nccl":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    x = torch.full((int(a.mib * 2**20) // 4,), float(rank), device=device)
    dist.all_reduce(x)
    sync()
    if x[0].item() != n * (n - 1) / 2:
        raise SystemExit(f"rank {rank}: all-reduce summed to {x[0].item()}, expected {n * (n - 1) / 2}")
    for _ in range(a.warmup):
        dist.all_reduce(x)
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.reps):
        dist.all_reduce(x)
    sync()
    seconds = (time.perf_counter() - t0) / a.reps
    nbytes = x.numel() * x.element_size()
    if rank == 0:
        name = torch.cuda.get_device_name(device) if device != "cpu" else "cpu"
        print(json.dumps({"backend": a.backend, "ranks": n, "device": name, "bytes": nbytes, "seconds": seconds,
                          "busbw_gbps": 2 * (n - 1) / n * nbytes / seconds / 1e9}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
