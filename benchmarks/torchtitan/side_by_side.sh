#!/usr/bin/env bash
# torchtitan 0.2.2 beside our `single` and `fsdp` on one host with 2 GPUs: same GPUs, same model
# (1,100,048,384 parameters), global batch 32 x 2048, bf16 mixed precision, compile on, plain causal
# attention, the same number of steps and the same excluded warm-up (45 and 5: steady steps 6-45 on both
# sides), one after another:
#
#   (a) ours  `single`  scripts/train.py --config configs/gpu2-1b.yaml --run single  (1 GPU, 16 x 2 accumulation)
#   (b) ours  `fsdp`    scripts/train.py --config configs/gpu2-1b.yaml --run fsdp    (FSDP2 over 2 GPUs, 16 each)
#   (c) torchtitan on 1 GPU, local batch 16 x 2 accumulation           (tt_launch.py + flags.py)
#   (d) torchtitan FSDP over 2 GPUs, data_parallel_shard_degree 2, 16 each
#
#   bash benchmarks/torchtitan/side_by_side.sh          # STUDY=h200x2-1b on H200s
#
# Needs: the project's packages importable (on a host without internet: `scripts/offline.py install` and its
# environment), the peer's wheelhouse in $PEERS (default wheelhouse-peers: `scripts/offline.py wheelhouse
# --requirements benchmarks/torchtitan/peers.txt --out wheelhouse-peers`), and results/<config's study>/data/
# {tokens,torchtitan} (the data rules and benchmarks/torchtitan/prepare.py). STUDY names where results go.
#
# Writes results/<study>/baselines/torchtitan_single.json and torchtitan_fsdp.json (parse.py; each holds our
# run of this invocation under ours_same_call) and results/<study>/baselines/torchtitan_side_by_side/ (our two
# run directories and table.txt); the four logs, env.txt, tt_versions.json and tt_imports.txt go to $OUT, and
# everything it wrote under results/ to $OUT/side_by_side_<study>.tgz as well.
#
# Every part has its own time limit (OURS_SINGLE_S 120, OURS_FSDP_S 110, TT_SINGLE_S 180, TT_FSDP_S 160
# seconds; on 2 x H100 they take ~80, ~65, ~80 and ~70 s). A hung part is killed (timeout: SIGTERM, SIGKILL
# 20 s later), GPU processes it left (torchrun's workers run in their own sessions) are killed by PID when
# their command line is ours, and the next part runs. STEPS=35 runs 35 steps on all four sides (steady
# 6-35); STEPS - 5 must be a multiple of 10 (torchtitan's log windows then end exactly at the last step).
# PARTS picks the parts (default "ours-single ours-fsdp tt-single tt-fsdp"); on one GPU, PARTS=tt-single with
# OURS_RUNS=results/<study>/runs sets torchtitan beside the runs the workflow trained just before on the same host
# (`scripts/offline.py study`), instead of training ours again; OURS_SINGLE names the run torchtitan's single-GPU
# run is set beside (default single). parse.py keeps that run's numbers only where it finished in torchtitan's
# session (same card model, at most the report's session gap before torchtitan started), and says why not.
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
OUT=${OUT:-side-by-side-out}
PEERS=${PEERS:-wheelhouse-peers}
CONFIG=${CONFIG:-configs/gpu2-1b.yaml}
NAME=$(python3 -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['study'])" "$CONFIG")
STUDY_NAME=${STUDY:-$NAME}
WARMUP=$(python3 -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['train']['warmup_steps_excluded'])" "$CONFIG")
STEPS=${STEPS:-45}
DATA=results/$NAME/data
BASE=results/$STUDY_NAME/baselines
SIDE=$BASE/torchtitan_side_by_side
TT_SITE=${TT_SITE:-/tmp/tt_site}
PARTS=${PARTS:-ours-single ours-fsdp tt-single tt-fsdp}
OURS_RUNS=${OURS_RUNS:-$SIDE}
part() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT" "$SIDE"
if (( (STEPS - WARMUP) % 10 )); then echo "STEPS - $WARMUP must be a multiple of 10 (got STEPS=$STEPS)"; exit 2; fi
for p in "$PEERS/manifest.json" "$DATA/tokens/meta.json" "$DATA/torchtitan/assets/tokenizer.json" \
         "$DATA/torchtitan/c4_test/train.jsonl.gz"; do
  [ -e "$p" ] || { echo "missing $p (see this script's header)"; exit 2; }
done
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.limit,memory.total \
  --format=csv | tee $OUT/env.txt

gpu_cleanup() {  # processes of this script's parts still on a GPU after a kill (torchrun's workers run in their
  # own sessions): only PIDs whose command line is ours (scripts/train.py, llmpar.train, torchrun, tt_launch.py),
  # and only on this job's GPUs (CUDA_VISIBLE_DEVICES): nvidia-smi lists every GPU's processes, and another job
  # may run ours on the others
  local p uuids
  uuids=$(nvidia-smi ${CUDA_VISIBLE_DEVICES:+-i $CUDA_VISIBLE_DEVICES} --query-gpu=uuid --format=csv,noheader | tr -d ' ')
  [ -n "$uuids" ] || return 0
  for p in $(nvidia-smi --query-compute-apps=pid,gpu_uuid --format=csv,noheader 2>/dev/null | tr -d ' ' \
             | grep -F "$uuids" | cut -d, -f1 | sort -u); do
    if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qE "llmpar|scripts/train.py|tt_launch.py|torch.distributed.run"; then
      echo "killing leftover GPU process $p: $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-120)"
      kill -9 "$p" 2>/dev/null
    fi
  done
  sleep 2
}

# ---- the peer's packages, in their own site, for torchtitan's processes only (datasets 4.7 refuses the
# huggingface_hub 2.x the project pins; the host's own stack serves the rest)
python3 scripts/offline.py install --wheelhouse "$PEERS" --target "$TT_SITE" > /dev/null || exit 2
PYTHONPATH=$TT_SITE python3 - <<'EOF' 2>&1 | tee $OUT/tt_imports.txt
import importlib, sys
sys.path.insert(0, "benchmarks/torchtitan")
import tt_launch
tt_launch.stub_tensorboard_if_missing()
mods = ["torch", "triton", "tokenizers", "huggingface_hub", "httpx", "pyarrow", "pandas", "fsspec", "xxhash", "requests",
        "tqdm", "yaml", "filelock", "packaging", "typing_extensions", "dill", "multiprocess", "datasets", "torchdata",
        "tyro", "typeguard", "docstring_parser", "tensorboard", "torchtitan", "torchtitan.models.llama3",
        "torchtitan.hf_datasets.text_datasets", "torchtitan.train"]
missing = []
for m in mods:
    try:
        mod = importlib.import_module(m)
        print(f"[tt-imports] ok      {m} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as exc:
        missing.append(m)
        print(f"[tt-imports] MISSING {m}: {type(exc).__name__}: {exc}")
need = [m for m in missing if m != "tensorboard"]  # tensorboard: stubbed by tt_launch.py
print("[tt-imports] " + ("all present" if not missing else f"missing: {' '.join(missing)}"
                          + ("" if need else " (tensorboard is stubbed; torchtitan can run)")))
sys.exit(1 if need else 0)
EOF
TT_OK=${PIPESTATUS[0]}
PYTHONPATH=$TT_SITE python3 - > $OUT/tt_versions.json <<'EOF'
import importlib.metadata as md, json, platform, subprocess
v = {"python": platform.python_version()}
def put(key, fn):
    try:
        v[key] = fn()
    except Exception as exc:
        v[key] = None
        v.setdefault("errors", []).append(f"{key}: {type(exc).__name__}: {exc}")
put("torch", lambda: __import__("torch").__version__)
put("cuda", lambda: __import__("torch").version.cuda)
put("nccl", lambda: ".".join(map(str, __import__("torch").cuda.nccl.version())))
put("cudnn", lambda: __import__("torch").backends.cudnn.version())
put("gpus", lambda: [__import__("torch").cuda.get_device_name(i) for i in range(__import__("torch").cuda.device_count())])
put("driver", lambda: subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.split()[0])
for pkg in ("torchtitan", "torchdata", "tyro", "typeguard", "docstring_parser", "datasets", "dill", "multiprocess",
            "tokenizers", "huggingface_hub", "httpx", "pyarrow", "fsspec", "xxhash", "tensorboard", "triton"):
    put(pkg, lambda: md.version(pkg))
print(json.dumps(v, indent=1))
EOF
echo "peer site ready (imports rc=$TT_OK) after $(( $(date +%s) - T0 ))s"
mkdir -p /tmp/tt_data/c4_test
gunzip -c $DATA/torchtitan/c4_test/train.jsonl.gz > /tmp/tt_data/c4_test/train.jsonl
export HF_HOME=/tmp/tt_hf HF_DATASETS_CACHE=/tmp/tt_hf/datasets HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# build the dataset's Arrow cache once, so neither run pays for it and the two FSDP ranks do not race for it
[ "$TT_OK" = 0 ] && PYTHONPATH=$TT_SITE timeout 60 python3 -c "
import datasets; ds = datasets.load_dataset('/tmp/tt_data/c4_test', split='train'); print('c4_test:', ds)" 2>&1 | tail -4

# ---- (a), (b): our loop, the preset's runs with the same step count
ours() {  # run limit
  local run=$1 t=$2
  local cmd=(python3 scripts/train.py --config "$CONFIG" --run "$run" --steps "$STEPS" --tokens "$DATA/tokens"
             --out "$SIDE/$run")
  echo "== ours $run (limit ${t}s): ${cmd[*]}" | tee "$OUT/ours_$run.log"
  local s; s=$(date +%s)
  timeout -k 20 "$t" "${cmd[@]}" >> "$OUT/ours_$run.log" 2>&1
  echo "ours $run rc=$? in $(( $(date +%s) - s ))s (at $(( $(date +%s) - T0 ))s)"
  gpu_cleanup
}
part ours-single && ours single "${OURS_SINGLE_S:-120}"
part ours-fsdp && ours fsdp "${OURS_FSDP_S:-110}"

# ---- (c), (d): torchtitan
tt() {  # mode ngpu limit our-run (whose summary goes into the JSON)
  local mode=$1 ngpu=$2 t=$3 TT_FLAGS
  mapfile -t TT_FLAGS < <(python3 benchmarks/torchtitan/flags.py "$ngpu" "$STEPS" "$PWD/$DATA/torchtitan/assets" \
    /tmp/tt_data/c4_test "/tmp/tt_dump_$mode")
  local cmd=(python3 -m torch.distributed.run --standalone --nproc_per_node "$ngpu" --role rank --tee 3
             benchmarks/torchtitan/tt_launch.py "${TT_FLAGS[@]}")
  echo "== torchtitan $mode (limit ${t}s): TT_ALIGN_WARMUP=$WARMUP ${cmd[*]}" | tee "$OUT/tt_$mode.log"
  local s e; s=$(date +%s.%N)
  if [ "$TT_OK" = 0 ]; then
    PYTHONPATH=$TT_SITE TT_ALIGN_WARMUP=$WARMUP timeout -k 20 "$t" "${cmd[@]}" >> "$OUT/tt_$mode.log" 2>&1
    echo "torchtitan $mode rc=$?"
  else
    echo "torchtitan $mode not run: modules missing (tt_imports.txt)" | tee -a "$OUT/tt_$mode.log"
  fi
  e=$(date +%s.%N)
  gpu_cleanup
  grep -E "size: .* total parameters|Peak FLOPS|Trainer is initialized|step: *[0-9]+ |\[llmpar\]" "$OUT/tt_$mode.log" \
    | sed 's/\x1b\[[0-9;]*m//g' | grep -E "^\[rank0\]|^\[titan\]|^\[llmpar\]" | cut -c1-220
  grep -E "Traceback|Error|error:" "$OUT/tt_$mode.log" | grep -v -i warn | head -5
  python3 benchmarks/torchtitan/parse.py --log "$OUT/tt_$mode.log" --mode "$mode" --gpus "$ngpu" --config "$CONFIG" \
    --warmup "$WARMUP" --steps "$STEPS" --versions "$OUT/tt_versions.json" --ours "$OURS_RUNS/$4/summary.json" \
    --started "$s" \
    --command "TT_ALIGN_WARMUP=$WARMUP ${cmd[*]}" --wall "$(python3 -c "print(round($e - $s, 1))")" \
    --out "$BASE/torchtitan_$mode.json"
  echo "torchtitan $mode done at $(( $(date +%s) - T0 ))s"
}
part tt-single && tt single 1 "${TT_SINGLE_S:-180}" "${OURS_SINGLE:-single}"
part tt-fsdp && tt fsdp 2 "${TT_FSDP_S:-160}" fsdp

# ---- the table
python3 - "$BASE" "$CONFIG" "$OURS_RUNS" "${OURS_SINGLE:-single}" <<'EOF' 2>&1 | tee "$SIDE/table.txt"
import json, os, sys
import yaml
sys.path.insert(0, "benchmarks/torchtitan")
from parse import torchtitan_flops_per_token
base, mc = sys.argv[1], yaml.safe_load(open(sys.argv[2]))["model"]
fpt_tt = torchtitan_flops_per_token(mc, mc.get("vocab_size") or 32000)
w = max(18, len("ours " + sys.argv[4]) + 2)  # the run column, as wide as the longest name
print(f"{'run':<{w}}{'status':<11}{'tokens/s':>10}{'per GPU':>9}{'MFU ours':>9}{'MFU tt':>8}{'alloc GiB':>10}"
      f"{'rsrvd GiB':>10}{'loss':>8}")
for mode in ("single", "fsdp"):
    p = f"{base}/torchtitan_{mode}.json"
    t = json.load(open(p)) if os.path.exists(p) else {}
    ours = sys.argv[4] if mode == "single" else mode  # the run torchtitan's run of this mode is set beside
    s_path = f"{sys.argv[3]}/{ours}/summary.json"
    s = json.load(open(s_path)) if os.path.exists(s_path) else {}
    f = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) else "-"
    mfu_tt_ours = (s["tokens_per_s_per_gpu"] * fpt_tt / s["peak_flops"]
                   if fpt_tt and s.get("tokens_per_s_per_gpu") and s.get("peak_flops") else None)
    print(f"{'ours ' + ours:<{w}}{s.get('status', 'missing'):<11}{f(s.get('tokens_per_s'), ',.0f'):>10}"
          f"{f(s.get('tokens_per_s_per_gpu'), ',.0f'):>9}{f(s.get('mfu'), '.3f'):>9}{f(mfu_tt_ours, '.3f'):>8}"
          f"{f(s.get('peak_mem_gib'), '.1f'):>10}{f(s.get('peak_reserved_gib'), '.1f'):>10}{f(s.get('final_loss'), '.4f'):>8}")
    print(f"{'torchtitan ' + mode:<{w}}{t.get('status', 'missing'):<11}{f(t.get('tokens_per_s'), ',.0f'):>10}"
          f"{f(t.get('tokens_per_s_per_gpu'), ',.0f'):>9}{f(t.get('mfu'), '.3f'):>9}{f(t.get('mfu_torchtitan'), '.3f'):>8}"
          f"{f(t.get('peak_mem_gib'), '.1f'):>10}{f(t.get('peak_reserved_gib'), '.1f'):>10}{f(t.get('train_loss'), '.4f'):>8}"
          f"  {t.get('message', '')[:100]}")
    if s.get("tokens_per_s") and t.get("tokens_per_s"):
        print(f"  torchtitan / ours {ours}: {t['tokens_per_s'] / s['tokens_per_s']:.3f}x tokens/s "
              f"(steady steps: ours {s.get('steady_steps')}, torchtitan {t.get('steady_windows')})")
print("MFU ours = 6N'+6Lhs per token (llmpar.metrics.definitions); MFU tt = 6N'+12Lhs (torchtitan's own); "
      "same tokens/s per GPU and peak; alloc = max_memory_allocated over the run, max over ranks")
EOF
ls -la "$OUT" "$BASE"
echo "elapsed $(( $(date +%s) - T0 ))s"
tar czf "$OUT/side_by_side_$STUDY_NAME.tgz" "$BASE"/torchtitan_*
