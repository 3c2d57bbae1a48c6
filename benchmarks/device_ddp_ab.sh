source benchmarks/device_setup.sh
# A/B for the DDP efficiency miss (BENCHMARKS.md): single-mb8, DDP, and DDP without its per-forward buffer
# broadcast (patched here, on the device copy only). Carry: .whl results/h100x2-1b/data/tokens.
T0=$(date +%s)
show() { python3 - "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json")); n = s.get("steady_steps") or 1
print(s["run"], s["status"], f"{s.get('tokens_per_s_per_gpu', 0):,.0f} tok/s/GPU, step {1000 * s['steady_time_s'] / n:.1f} ms",
      [{k: round(1000 * v / n, 1) for k, v in (r.get("breakdown") or {}).items()} for r in s["per_rank"]])
PY
}
for r in single-mb8 ddp; do
  timeout 110 python3 scripts/train.py --config configs/gpu2-1b.yaml --run $r --steps 25 --tokens results/h100x2-1b/data/tokens --out $OUT/$r > $OUT/$r.log 2>&1; echo "$r rc=$? at $(( $(date +%s) - T0 ))s"; show $OUT/$r
done
sed -i 's/DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)/DDP(model, device_ids=device_ids, gradient_as_bucket_view=True, broadcast_buffers=False)/' src/llmpar/strategies/ddp.py
grep -c broadcast_buffers=False src/llmpar/strategies/ddp.py
timeout 90 python3 scripts/train.py --config configs/gpu2-1b.yaml --run ddp --steps 25 --tokens results/h100x2-1b/data/tokens --out $OUT/ddp-nobcast > $OUT/ddp-nobcast.log 2>&1; echo "ddp-nobcast rc=$? at $(( $(date +%s) - T0 ))s"; show $OUT/ddp-nobcast
