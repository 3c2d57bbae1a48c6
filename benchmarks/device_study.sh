#!/usr/bin/env bash
# One device call of a GPU study: the named runs through the real workflow (Snakemake -> the
# launcher -> torchrun -> NCCL), optionally the Hugging Face Trainer baseline in the same call.
#
#   CONFIG=configs/gpu2-1b.yaml STUDY=h100x2-1b bash benchmarks/device_study.sh PART "RUN ..." [options]
#
# CONFIG defaults to configs/h200-1b.yaml and STUDY to the config's study name; a STUDY other than the
# config's (e.g. h200x2-1b when the 2-GPU call came on H200s) gets a copy of the carried token shards.
#
#   probe            first time `single`'s step with flash and with cuDNN attention (fresh compiles,
#                    inductor caches off) and keep the faster backend for the study (train.attention)
#   trainer          HF Trainer, eager (its defaults + bf16), same model/batch/sequence/data
#   trainer-compile  the same with torch_compile=True
#
# Carry: .whl results/<config's study>/data/tokens (tokenized on the CPU side). The run directories
# (without checkpoints), the training logs and the Trainer results come back as $OUT/runs_PART.tgz.
source benchmarks/device_setup.sh
PART=$1
RUNS=$2
shift 2
OPTS=" $* "
T0=$(date +%s); export T0
CONFIG=${CONFIG:-configs/h200-1b.yaml}
NAME=$(python3 -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['study'])" "$CONFIG")
STUDY_NAME=${STUDY:-$NAME}
if [ "$STUDY_NAME" != "$NAME" ] && [ ! -d results/$STUDY_NAME/data/tokens ]; then
  mkdir -p results/$STUDY_NAME/data && cp -r results/$NAME/data/tokens results/$STUDY_NAME/data/
fi
STUDY=results/$STUDY_NAME
export STUDY
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.limit --format=csv \
  | tee $OUT/env_$PART.txt

if [[ $OPTS == *" probe "* ]]; then
  TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0 timeout 200 \
    python3 benchmarks/gpu_probe.py --no-micro --variants flash16,cudnn16 --out $OUT/probe_$PART.jsonl \
    > $OUT/probe_$PART.log 2>&1
  ATTENTION=$(python3 - "$OUT/probe_$PART.jsonl" <<'EOF'
import json, sys
rows = {r["name"]: r for r in map(json.loads, open(sys.argv[1])) if r.get("kind") == "step"}
f, c = (rows.get(n, {}).get("tokens_per_s") or 0 for n in ("flash16", "cudnn16"))
print("flash" if f > c else "cudnn")
EOF
)
  grep '"kind": "step"' $OUT/probe_$PART.jsonl | cut -c1-400
  # the study's config with train.attention set to the faster backend (part of every run's config hash)
  python3 - "$CONFIG" "$ATTENTION" > /tmp/study_config.yaml <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["train"]["attention"] = sys.argv[2]
print(yaml.safe_dump(cfg, sort_keys=False))
EOF
  CONFIG=/tmp/study_config.yaml
fi
echo "attention backend: $(python3 -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['train'].get('attention', 'cudnn (default)'))" "$CONFIG")"

targets=()
for r in $RUNS; do targets+=("$STUDY/runs/$r/summary.json"); done
# --allowed-rules train: the carried token shards are taken as they are (no corpus/tokenizer rebuild)
# --scheduler greedy: the ILP scheduler needs pulp, which is not carried (one job at a time anyway)
timeout ${STUDY_TIMEOUT:-560} snakemake --cores 1 --scheduler greedy --configfile $CONFIG \
  --config recorded=False study=$STUDY_NAME --allowed-rules train --keep-going -- "${targets[@]}" \
  > $OUT/snakemake_$PART.log 2>&1
echo "snakemake rc=$? after $(( $(date +%s) - T0 ))s"

mkdir -p $STUDY/baselines
if [[ $OPTS == *" trainer "* ]]; then
  timeout 200 python3 benchmarks/hf_trainer.py --tokens $STUDY/data/tokens --out $STUDY/baselines/hf_trainer_eager.json \
    --steps 16 --warmup 5 > $OUT/trainer_eager_$PART.log 2>&1
fi
if [[ $OPTS == *" trainer-compile "* ]]; then
  timeout 260 python3 benchmarks/hf_trainer.py --tokens $STUDY/data/tokens --out $STUDY/baselines/hf_trainer_compile.json \
    --steps 16 --warmup 5 --compile > $OUT/trainer_compile_$PART.log 2>&1
fi

python3 - $RUNS <<'EOF' 2>&1 | tee $OUT/table_$PART.txt
import json, os, sys
study = os.environ["STUDY"]
print(f"{'run':<17}{'status':<9}{'tokens/s':>10}{'MFU':>7}{'peak GiB':>10}{'util %':>8}{'final loss':>11}{'mbs':>4}")
ours = {}
for run in sys.argv[1:]:
    p = f"{study}/runs/{run}/summary.json"
    if not os.path.exists(p):
        print(f"{run:<17}missing"); continue
    s = json.load(open(p))
    ours[run] = s.get("tokens_per_s")
    f = lambda k, fmt: format(s[k], fmt) if isinstance(s.get(k), (int, float)) else "-"
    print(f"{run:<17}{s['status']:<9}{f('tokens_per_s', ',.0f'):>10}{f('mfu', '.3f'):>7}"
          f"{f('peak_mem_gib', '.1f'):>10}{f('util_mean_pct', '.1f'):>8}{f('final_loss', '.4f'):>11}"
          f"{s.get('spec', {}).get('micro_batch_size', '-'):>4}  {s.get('message', '')[:120]}")
for kind in ("eager", "compile"):
    p = f"{study}/baselines/hf_trainer_{kind}.json"
    if os.path.exists(p) and os.path.getmtime(p) > float(os.environ.get("T0", 0)):
        t = json.load(open(p))
        line = f"HF Trainer ({kind}): {t['tokens_per_s']:,.0f} tokens/s, MFU {t['mfu']:.3f}, peak {t['peak_mem_gib']:.1f} GiB"
        if ours.get("single"):
            line += f"; single / Trainer = {ours['single']:,.0f} / {t['tokens_per_s']:,.0f} = {ours['single'] / t['tokens_per_s']:.2f}x"
        print(line)
EOF
tar czf $OUT/runs_$PART.tgz --exclude=checkpoints $(for r in $RUNS; do [ -d $STUDY/runs/$r ] && echo $STUDY/runs/$r; done) \
  $(ls -d $STUDY/baselines/*.json 2>/dev/null) logs/$STUDY_NAME/train 2>/dev/null
ls -la $OUT
echo "elapsed $(( $(date +%s) - T0 ))s"
