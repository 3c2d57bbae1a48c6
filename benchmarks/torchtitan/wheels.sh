#!/usr/bin/env bash
# Here (CPU machine, with PyPI): the wheels the torchtitan peer needs on the GPU image (Python 3.12,
# torch 2.11, no network), into .whl-peers/ (ignored: .whl-peers/.gitignore ignores everything in it).
#
# torchtitan 0.2.2 is the newest release that imports on torch 2.11 (0.3.0 imports DataParallelMeshDims
# from torch.distributed.fsdp, which 2.11 lacks). Besides itself it needs what the image lacks: torchdata,
# tyro (+ docstring-parser, typeguard; shtab for older tyro), tomli, datasets 4.7 (+ dill, multiprocess),
# and typing-extensions as a hedge (peers.txt says why).
# dill and multiprocess are pinned to what datasets 4.7.0 accepts (dill<0.4.1, multiprocess<0.70.19).
# Everything else torchtitan and datasets import (tokenizers, huggingface_hub<2, httpx, pyarrow, pandas,
# fsspec, xxhash, requests, tqdm, pyyaml, tensorboard, triton) is expected on the image; the device
# script checks each import before training and names what is missing.
#
# These go into their own --target directory on the device, on PYTHONPATH of torchtitan's processes
# only: our .whl carries huggingface_hub 2.4, which datasets 4.7 does not accept (<2.0).
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP="${PIP:-.venv/bin/python -m pip}"
PEERS=$(grep -v '^#' benchmarks/torchtitan/peers.txt)
mkdir -p .whl-peers
[ -f .whl-peers/.gitignore ] || printf '*\n' > .whl-peers/.gitignore
rm -f .whl-peers/*.whl
for spec in $PEERS; do
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl-peers "$spec" 2>&1 | grep -v "is ignored" || true
  name=${spec%%==*}
  ls .whl-peers | grep -qi "^${name//-/_}-${spec##*==}-" || { echo "missing wheel for $spec" >&2; exit 1; }
done
ls -la .whl-peers/*.whl
echo "$(ls .whl-peers/*.whl | wc -l) wheels, $(du -cb .whl-peers/*.whl | tail -1 | cut -f1) bytes ($(du -sh .whl-peers | cut -f1))"
