#!/usr/bin/env bash
# One device call on a 4-GPU host (issue 16: hybrid-deepspeed's step miss at micro-batches of 2):
#   - pp-deepspeed-mb2 of configs/gpu2-1b.yaml (DeepSpeed's pipeline, 2 stages, 16 micro-batches of 2)
#     recorded through the workflow on GPUs 0,1, alone on the host;
#   - then where its step and pp-deepspeed's (8 micro-batches of 4) go (benchmarks/profile_step.py:
#     compute, NCCL alone, nothing) on GPUs 0,1.
#
#   bash benchmarks/device_ds_pipeline_mb2.sh
#
# Carry: .whl results/h100x2-1b/data/tokens. Comes back under $OUT: runs_mb2.tgz, the workflow's and the
# profiles' logs, profile_<run>.json.
T0=$(date +%s); source benchmarks/device_setup.sh
export CUDA_VISIBLE_DEVICES=0,1
CONFIG=configs/gpu2-1b.yaml STUDY=h100x2-1b STUDY_TIMEOUT=200 bash benchmarks/device_study.sh mb2 pp-deepspeed-mb2 \
  2>&1 | grep -v "^total\|^-r\|^d"
for r in pp-deepspeed-mb2 pp-deepspeed; do
  timeout $((370 - ($(date +%s) - T0))) torchrun --nproc-per-node 2 benchmarks/profile_step.py --config configs/gpu2-1b.yaml \
    --run-name $r --tokens results/h100x2-1b/data/tokens --out "$OUT" > "$OUT/profile_$r.log" 2>&1
  echo "profile $r rc=$? $(( $(date +%s) - T0 ))s"; tail -4 "$OUT/profile_$r.log"
done
echo "elapsed $(( $(date +%s) - T0 ))s"
