#!/usr/bin/env bash
# On a CPU machine with PyPI: what can be checked of the torchtitan side without a GPU. Installs the pinned
# peers (peers.txt) for this machine's Python into $SITE, then runs tt_launch.py with TT_CHECK=1 and the
# exact flags side_by_side.sh passes (flags.py): torchtitan's ConfigManager (tyro) parses them, the model is
# built on the meta device (parameter count, its FLOPs per token, SwiGLU width), and the c4_test loader
# reads the prepared data with the prepared tokenizer (first sample). Asserts the parameter count is ours.
#
#   bash benchmarks/torchtitan/check_cpu.sh      # runs prepare.py first if its data is missing
#
# Stand-ins for the CPU only (never on a GPU host): httpx is installed into $SITE when missing (datasets 4.7
# imports it; a GPU host's stack has it with huggingface_hub), and, when triton is missing (CPU torch has
# none), a sitecustomize that stands in for torchtitan's MoE kernel module, the one that imports triton.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SITE=${SITE:-/tmp/tt_cpu_site}
CONFIG=${CONFIG:-configs/gpu2-1b.yaml}
STUDY=${STUDY:-$($PY -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['study'])" "$CONFIG")}
TT=results/$STUDY/data/torchtitan
[ -f $TT/c4_test/train.jsonl.gz ] || PYTHONPATH=src $PY benchmarks/torchtitan/prepare.py --config "$CONFIG" --study "$STUDY"
if [ ! -f $SITE/.done ]; then
  rm -rf $SITE
  $PY -m pip install -q --no-deps --target $SITE $(grep -v '^#' benchmarks/torchtitan/peers.txt) 2>&1 | grep -v "is ignored" || true
  PYTHONPATH=$SITE $PY -c "import httpx" 2>/dev/null || $PY -m pip install -q --target $SITE/_cpu httpx 2>&1 | grep -v "is ignored" || true
  if ! $PY -c "import triton" 2>/dev/null; then
    mkdir -p $SITE/_cpu
    cat > $SITE/_cpu/sitecustomize.py <<'EOF'
"""CPU stand-in (check_cpu.sh only): torchtitan's MoE kernels import triton, which CPU torch lacks; the
dense Llama never calls them."""
import sys
import types

_kernels = types.ModuleType("torchtitan.models.moe.kernels")
_kernels.generate_permute_indices = None
sys.modules["torchtitan.models.moe.kernels"] = _kernels
EOF
  fi
  touch $SITE/.done
fi
DATA=/tmp/tt_check_data/c4_test
rm -rf $DATA && mkdir -p $DATA && gunzip -c $TT/c4_test/train.jsonl.gz > $DATA/train.jsonl
mapfile -t TT_FLAGS < <($PY benchmarks/torchtitan/flags.py 1 45 "$PWD/$TT/assets" "$DATA" /tmp/tt_check_dump)
export HF_DATASETS_CACHE=/tmp/tt_check_hf_cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out=$(TT_CHECK=1 PYTHONPATH=$SITE:$SITE/_cpu $PY benchmarks/torchtitan/tt_launch.py "${TT_FLAGS[@]}" 2>&1) || { echo "$out" | tail -30; exit 1; }
echo "$out" | grep "^\[llmpar\]"
echo "$out" | grep "^\[llmpar\] check " | sed 's/^\[llmpar\] check //' | PYTHONPATH=src $PY -c "
import json, sys
from llmpar.shape import flops_per_token, param_counts
c = json.load(sys.stdin)
mc = {'size': '1B', 'seq_len': 2048, 'vocab_size': 32000}
ours = param_counts(mc, 32000)
assert c['params'] == ours['total'] == 1_100_048_384, (c['params'], ours['total'])
assert c['ffn_hidden'] == 5632 and c['vocab_size'] == 32000, c
tt_formula = 6 * ours['non_embedding'] + 12 * 22 * 2048 * 2048
assert c['flops_per_token'] == tt_formula, (c['flops_per_token'], tt_formula)
print(f\"parameters {c['params']:,} (ours {ours['total']:,}); FLOPs/token torchtitan {c['flops_per_token']:,} \"
      f\"ours {flops_per_token(mc, 32000):,.0f} (ratio {c['flops_per_token'] / flops_per_token(mc, 32000):.4f})\")
print('first tokens', c['first_tokens'], 'eos', c['eos_id'], 'bos', c['bos_id'])
"
