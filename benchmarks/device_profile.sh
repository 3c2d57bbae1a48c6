#!/usr/bin/env bash
# Device call: where the `single` step's time goes. One fresh process (and inductor cache) per SDPA
# priority, each timing 6 steps and profiling 2 (kernel time by category, top kernels).
source benchmarks/device_setup.sh
for be in cudnn flash; do
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$be timeout 150 python3 benchmarks/gpu_probe.py --no-micro --profile \
    --variants ${be}16 --out $OUT/profile.jsonl > $OUT/profile_$be.log 2>&1
done
python3 - <<'PY'
import json, os
for line in open(os.environ["OUT"] + "/profile.jsonl"):
    r = json.loads(line)
    if r.get("kind") != "step":
        continue
    print(r["name"], f"{r.get('tokens_per_s', 0):,.0f} tok/s mfu={r.get('mfu', 0):.3f}", r.get("error", ""))
    prof = r.get("profile") or {}
    print("  per step (s):", prof.get("per_step_s"), "kernel total", prof.get("kernel_total_s"))
    for k, t in prof.get("top", []):
        print(f"   {t:8.4f}  {k}")
PY
