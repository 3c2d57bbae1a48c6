#!/usr/bin/env bash
# Here (CPU machine, with PyPI): the wheels a device call carries in .whl/ for the GPU image
# (Python 3.12, torch 2.11, no network). Two kinds, all at the versions of requirements/lock.txt:
#  * what the image lacks: DeepSpeed, Snakemake and their dependencies;
#  * the Hugging Face stack the model code runs on (transformers and its tokenizers, hub, safetensors),
#    so the GPU runs use the transformers version the CPU tests pinned, not the image's (5.17).
# Not carried: pulp (16 MB; only Snakemake's ILP scheduler imports it: device calls pass --scheduler greedy).
# device_setup.sh installs them into /tmp/site ahead of the image's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/python -m pip}"
CARRY="annotated-types argparse-dataclass conda-inject configargparse connection-pool deepspeed docutils dpath
fastjsonschema gitdb gitpython greenlet hjson httpcore2 httpx2 humanfriendly immutables jsonschema
jsonschema-specifications jupyter-core nbformat platformdirs pydantic pydantic-core referencing rpds-py
smart-open smmap snakemake snakemake-executor-plugin-slurm snakemake-executor-plugin-slurm-jobstep
snakemake-interface-common snakemake-interface-executor-plugins snakemake-interface-logger-plugins
snakemake-interface-report-plugins snakemake-interface-scheduler-plugins snakemake-interface-storage-plugins
sqlalchemy sqlmodel tenacity throttler traitlets truststore typing-inspection tzdata yte
transformers tokenizers huggingface-hub safetensors hf-xet"
pin() {  # name -> name==version from the lock file (names compared case- and -/_-insensitively)
  python3 - "$1" <<'PY'
import sys
want = sys.argv[1].lower().replace("_", "-")
for line in open("requirements/lock.txt"):
    if "==" in line and not line.startswith("#"):
        name, ver = line.strip().split("==")
        if name.lower().replace("_", "-") == want:
            print(f"{name}=={ver}"); break
else:
    sys.exit(f"{want} is not in requirements/lock.txt")
PY
}
rm -rf .whl && mkdir -p .whl
sdists=""
for name in $CARRY; do
  spec=$(pin "$name")
  if ! $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
      --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .whl "$spec" 2>/dev/null; then
    sdists="$sdists $spec"
  fi
done
# sdist-only packages (DeepSpeed: a pure wheel without its CUDA ops, which it JIT-builds on the GPU)
[ -z "$sdists" ] || DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation $sdists -w .whl
ls .whl | wc -l
du -sh .whl
