#!/usr/bin/env bash
# One device call on a 4-GPU host, two jobs side by side on disjoint GPUs:
#   GPUs 0,1: the GPU test suite (benchmarks/device_test_gpu.sh, `make test-gpu`)
#   GPUs 2,3: the cost of metric collection (benchmarks/metrics_overhead.py, arms $OVERHEAD_ARMS, default
#             on,off) for the runs of configs/gpu2-1b.yaml named in $OVERHEAD_RUNS (default: zero1 zero3),
#             one after the other
# The jobs share the host's CPUs (64 cores) and nothing else; each ratio compares runs of one job.
#
#   bash benchmarks/device_suite_beside_overhead.sh
#
# Carry: .whl results/h100x2-1b/data/tokens. Comes back under $OUT: test_gpu.txt, versions.txt, the
# suite's runs (gpu_suite_runs.tgz), and metrics_overhead_<run>.{json,log}.
T0=$(date +%s)
source benchmarks/device_setup.sh   # installs the wheels once, before the suite sources it again
left() { echo $(( ${1:-570} - ($(date +%s) - T0) )); }
( export CUDA_VISIBLE_DEVICES=0,1
  SUITE_TIMEOUT=$(left 568) bash benchmarks/device_test_gpu.sh > "$OUT/suite.log" 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=2,3
  for run in ${OVERHEAD_RUNS:-zero1 zero3}; do
    timeout -k 10 "$(left 560)" python3 benchmarks/metrics_overhead.py --config configs/gpu2-1b.yaml \
      --tokens results/h100x2-1b/data/tokens --run "$run" --steps "${STEPS:-18}" --repeats "${REPEATS:-2}" \
      --arms "${OVERHEAD_ARMS:-on,off}" --json "$OUT/metrics_overhead_$run.json" > "$OUT/metrics_overhead_$run.log" 2>&1
  done ) &
wait
tail -60 "$OUT/suite.log"
for f in "$OUT"/metrics_overhead_*.log; do echo "== $f"; grep -v "^\s*$" "$f" | tail -8; done
echo "elapsed $(( $(date +%s) - T0 ))s"
