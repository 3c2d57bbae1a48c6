#!/usr/bin/env bash
# Device call 1: environment, ceilings, attention backends, the `single` step under a few settings,
# the Hugging Face Trainer baseline, and smoke tests of the launcher (single and ZeRO-3 on NCCL).
# Carry: .whl results/h200-1b/data/tokens. Logs and JSON lines land in $OUT.
source benchmarks/device_setup.sh
T0=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - T0) )); }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)"
  snakemake --version
} 2>&1 | tee $OUT/env.txt
timeout $(left 330) python3 benchmarks/gpu_probe.py --out $OUT/probe.jsonl --deadline 280 \
  --variants "${PROBE_VARIANTS:-base,cudnn,noce,mbs16,eager,mbs4}" 2>&1 | tee $OUT/probe.log | grep -v "^\s*$" | tail -40
timeout $(left 450) python3 benchmarks/hf_trainer.py --tokens results/h200-1b/data/tokens --out $OUT/trainer_eager.json \
  --steps 14 --warmup 4 2>&1 | tee $OUT/trainer.log | tail -3
# launcher smoke test: single through scripts/train.py (torchrun, NCCL), 4 steps
timeout $(left 540) python3 scripts/train.py --config configs/h200-1b.yaml --run single --steps 6 \
  --tokens results/h200-1b/data/tokens --out /tmp/smoke/single 2>&1 | tee $OUT/smoke_single.log | tail -6
if [ "$(left 600)" -gt 70 ]; then
  timeout $(left 590) python3 scripts/train.py --config configs/h200-1b.yaml --run zero3 --steps 4 \
    --tokens results/h200-1b/data/tokens --out /tmp/smoke/zero3 2>&1 | tee $OUT/smoke_zero3.log | tail -6
fi
python3 - <<'EOF' 2>&1 | tee $OUT/summary.txt
import json, os
for l in open(os.environ["OUT"] + "/probe.jsonl"):
    r = json.loads(l)
    if r["kind"] == "step":
        print(f"{r['name']:>10} mbs={r['mbs']} ce={r['fused_ce']} be={r['backend']} comp={r['compile']}: "
              f"{r.get('tokens_per_s', 0):,.0f} tok/s mfu={r.get('mfu', 0):.3f} mem={r.get('peak_mem_gib', 0):.1f} "
              f"warm={r.get('warmup_s', 0):.0f}s {r.get('error', '')}")
    elif r["kind"] in ("matmul", "gemm", "attention", "choice"):
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()})
for f in ("trainer_eager.json",):
    p = os.environ["OUT"] + "/" + f
    if os.path.exists(p):
        r = json.load(open(p)); print(f, f"{r['tokens_per_s']:,.0f} tok/s mfu={r['mfu']:.3f} mem={r['peak_mem_gib']:.1f}")
EOF
for f in /tmp/smoke/*/summary.json; do [ -f "$f" ] && python3 -c "import json,sys; s=json.load(open('$f')); print('$f', s['status'], s.get('tokens_per_s'), s.get('mfu'), s.get('peak_mem_gib'), s.get('util_mean_pct'), s.get('message'))"; done 2>&1 | tee -a $OUT/summary.txt
echo "elapsed $(( $(date +%s) - T0 ))s"
