#!/usr/bin/env bash
# One device call on a 4-GPU host: the cost of metric collection (benchmarks/metrics_overhead.py) for the
# engines whose noise-scale measurement hooks into the gradient path, two jobs side by side on disjoint GPUs:
#   GPUs 0,1: `ddp` (communication hook), arms on / no-sampler / off, interleaved
#   GPUs 2,3: `fsdp` (custom reduce-scatter), then `zero2` (DeepSpeed parameter gradient hooks), on / off
# of configs/gpu2-1b.yaml. Each ratio compares runs of one job on one pair of cards; the jobs share the
# host's CPUs (64 cores) and nothing else.
#
#   bash benchmarks/device_metrics_overhead.sh
#
# Carry: .whl results/h100x2-1b/data/tokens. Comes back under $OUT: one log and one JSON per run name.
T0=$(date +%s)
source benchmarks/device_setup.sh
left() { echo $(( ${1:-570} - ($(date +%s) - T0) )); }
bench() {  # run steps repeats arms
  timeout -k 10 "$(left 575)" python3 benchmarks/metrics_overhead.py --config configs/gpu2-1b.yaml \
    --tokens results/h100x2-1b/data/tokens --run "$1" --steps "$2" --repeats "$3" --arms "$4" \
    --json "$OUT/metrics_overhead_$1.json" > "$OUT/metrics_overhead_$1.log" 2>&1
}
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.limit --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0,1; bench ddp "${DDP_STEPS:-18}" "${DDP_REPEATS:-3}" on,no-sampler,off ) &
( export CUDA_VISIBLE_DEVICES=2,3
  bench fsdp "${STEPS:-18}" "${REPEATS:-2}" on,off
  bench zero2 "${STEPS:-18}" "${REPEATS:-2}" on,off ) &
wait
for f in "$OUT"/metrics_overhead_*.log; do echo "== $f"; grep -v "^\s*$" "$f" | tail -12; done
echo "elapsed $(( $(date +%s) - T0 ))s"
