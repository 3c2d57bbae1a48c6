#!/usr/bin/env bash
# The seed's three commands on the GPU machine, as the seed writes them (with --steps added), each
# run's directory and output kept under results/$STUDY/seed/<strategy>/ (summary.json, steps.jsonl,
# command.txt, output.log). `python` is the image's python3 (the image has no `python`).
#
#   STUDY=h100x2-1b bash benchmarks/device_seed_commands.sh [steps]
source benchmarks/device_setup.sh
STEPS=${1:-20}
DEST=results/${STUDY:-h100x2-1b}/seed
run() {  # name, then the seed's arguments
  local name=$1; shift
  local cmd="python scripts/train.py $* --steps $STEPS"
  mkdir -p $DEST/$name
  echo "$cmd" > $DEST/$name/command.txt
  echo "== $cmd"
  local t0=$(date +%s)
  timeout 300 $cmd > $DEST/$name/output.log 2>&1
  echo "rc=$? in $(( $(date +%s) - t0 ))s"
  cp results/cli/runs/$name/summary.json results/cli/runs/$name/steps.jsonl $DEST/$name/ 2>/dev/null
  grep -E "ok:|oom:|invalid:|diverged:|error" $DEST/$name/output.log | tail -3
}
run data_parallel --strategy data_parallel --model_size 1B
run pipeline_parallel --strategy pipeline_parallel --stages 2
run hybrid_parallel --strategy hybrid_parallel --nodes 2 --gpus_per_node 1
