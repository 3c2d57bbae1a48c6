#!/usr/bin/env bash
# One device call on a 2-GPU machine: `make test-gpu` with the image's CUDA torch (carry: .whl).
# Writes $OUT/test_gpu.txt (the pytest output, named by card) and $OUT/versions.txt.
#
#   bash benchmarks/device_test_gpu.sh [pytest args]
source benchmarks/device_setup.sh
T0=$(date +%s)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -d ' ')
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers, deepspeed; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'nccl', '.'.join(map(str, torch.cuda.nccl.version())), 'transformers', transformers.__version__,
'deepspeed', deepspeed.__version__, 'GPUs', torch.cuda.device_count())" 2>&1 | grep -v WARN
} | tee $OUT/versions.txt
# -s: the tests' own lines (loss gaps, peaks) stream out as they happen, kept even if the call runs out
timeout ${SUITE_TIMEOUT:-570} make test-gpu GPU_PYTHON=python3 \
  PYTEST_ADDOPTS="-p no:cacheprovider -s --basetemp=/tmp/gpu-suite $*" > $OUT/test_gpu.txt 2>&1
echo "make test-gpu rc=$?"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|max rel|^1.1B|^bubble|single bf16|GiB|Error" $OUT/test_gpu.txt | tail -90
# every run's summary, steps and launch log (pytest's temporary directory)
(cd /tmp/gpu-suite && find . -name "*.log" -o -name summary.json -o -name steps.jsonl | tar czf $OUT/gpu_suite_runs.tgz -T -)
echo "card: $card; elapsed $(( $(date +%s) - T0 ))s"
