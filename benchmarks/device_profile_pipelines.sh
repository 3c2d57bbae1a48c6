#!/usr/bin/env bash
# One device call on a 4-GPU host (issue 16: the runs the plan misses, issue 17: the metric cost):
#   where the step time of pp4-interleaved, pp4-1f1b and hybrid-deepspeed (configs/gpu4-1b.yaml) goes on
#   each GPU (benchmarks/profile_step.py: compute, NCCL alone, nothing), one after the other on 4 GPUs;
#   then the cost of metric collection for zero1 on GPUs 0,1 (arms on, every4, off).
#
#   bash benchmarks/device_profile_pipelines.sh
#
# Carry: .whl results/h100x2-1b/data/tokens results/h100x4-1b/data/tokens. Comes back under $OUT:
# profile_<run>/rank<r>.json and .log, metrics_overhead_zero1.{json,log}.
T0=$(date +%s); source benchmarks/device_setup.sh
for r in pp4-interleaved pp4-1f1b hybrid-deepspeed; do timeout 150 torchrun --nproc-per-node 4 benchmarks/profile_step.py --config configs/gpu4-1b.yaml --run-name $r --tokens results/h100x4-1b/data/tokens --out $OUT/profile_$r > $OUT/profile_$r.log 2>&1; tail -7 $OUT/profile_$r.log; done
echo profiles $(( $(date +%s)-T0 ))s
CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 $((580-($(date +%s)-T0))) python3 benchmarks/metrics_overhead.py --config configs/gpu2-1b.yaml --tokens results/h100x2-1b/data/tokens --run zero1 --steps 18 --repeats 2 --arms on,every4,off --json $OUT/metrics_overhead_zero1.json > $OUT/metrics_overhead_zero1.log 2>&1; tail -4 $OUT/metrics_overhead_zero1.log
echo elapsed $(( $(date +%s)-T0 ))s
