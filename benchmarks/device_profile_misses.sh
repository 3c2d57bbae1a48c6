#!/usr/bin/env bash
# One device call on a 4-GPU host (issue 16, the runs the plan misses):
#   - DeepSpeed ZeRO-3's memory at its peak (benchmarks/profile_step.py --memory: the allocator's history
#     replayed, live blocks grouped by where they were allocated), at 4 GPUs (configs/gpu4-1b.yaml) and
#     at 2 (configs/gpu2-1b.yaml, GPUs 0,1);
#   - where pp4-interleaved's and pp4-1f1b's steps go, with each pipeline action's host and device spans
#     on one clock (benchmarks/profile_step.py).
#
#   bash benchmarks/device_profile_misses.sh
#
# Carry: .whl results/h100x2-1b/data/tokens results/h100x4-1b/data/tokens. Comes back under $OUT:
# zero3_memory_gpu{4,2}.json, profile_<run>.json, misses.log.
T0=$(date +%s); source benchmarks/device_setup.sh
prof() { timeout "$1" torchrun --nproc-per-node "$2" benchmarks/profile_step.py --config "$3" --tokens "$4" \
  --out "$OUT/tmp" "${@:5}" >> "$OUT/misses.log" 2>&1; echo "rc=$? $(( $(date +%s) - T0 ))s: ${*:5}"; }
prof 160 4 configs/gpu4-1b.yaml results/h100x4-1b/data/tokens --run-name zero3 --memory --warmup 3 --steps 1
mv "$OUT/tmp/zero3_memory.json" "$OUT/zero3_memory_gpu4.json"
CUDA_VISIBLE_DEVICES=0,1 prof 160 2 configs/gpu2-1b.yaml results/h100x2-1b/data/tokens --run-name zero3 --memory --warmup 3 --steps 1
mv "$OUT/tmp/zero3_memory.json" "$OUT/zero3_memory_gpu2.json"
for r in pp4-interleaved:120 pp4-1f1b:110; do
  t=${r#*:}; r=${r%:*}
  prof "$t" 4 configs/gpu4-1b.yaml results/h100x4-1b/data/tokens --run-name $r
  mv "$OUT/tmp/$r.json" "$OUT/profile_$r.json"
done
rm -rf "$OUT/tmp"
grep -v "^\s*$\|Warning\|warn" "$OUT/misses.log" | grep -E "^rank|GiB|^ +[0-9]|pp4|step_s" | head -90
echo "elapsed $(( $(date +%s) - T0 ))s"
