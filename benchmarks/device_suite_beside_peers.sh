#!/usr/bin/env bash
# One device call on a 4-GPU host, two jobs side by side on disjoint GPUs:
#   GPUs 0,1: the GPU test suite (benchmarks/device_test_gpu.sh, `make test-gpu`)
#   GPUs 2,3: the peers beside our loop (benchmarks/torchtitan/device_side_by_side.sh: our `single` and
#             `fsdp`, torchtitan on 1 and 2 GPUs), then the Hugging Face Trainer on GPU 2 (defaults +
#             bf16) and GPU 3 (torch_compile=True) at the same time, on the same cards.
# The two jobs share the host's CPUs (64 cores) and nothing else; each timing compares runs of one job.
#
#   bash benchmarks/device_suite_beside_peers.sh
#
# Carry: .whl .whl-peers results/h100x2-1b/data/tokens results/h100x2-1b/data/torchtitan
# Comes back under $OUT: suite.tgz (test_gpu.txt, versions.txt, the suite's runs), peers.tgz (the
# side-by-side's results/<study>/baselines with the Trainer's JSON, logs), test_gpu.txt and table.txt.
T0=$(date +%s)
source benchmarks/device_setup.sh   # installs the wheels once, before the two jobs source it again
TOP=$OUT
STUDY=${STUDY:-h100x2-1b}
left() { echo $(( ${1:-570} - ($(date +%s) - T0) )); }

( export CUDA_VISIBLE_DEVICES=0,1 OUT=/tmp/o_suite; mkdir -p $OUT
  SUITE_TIMEOUT=$(left 568) bash benchmarks/device_test_gpu.sh > $OUT/main.log 2>&1 ) &

( export CUDA_VISIBLE_DEVICES=2,3 OUT=/tmp/o_peers; mkdir -p $OUT
  BUDGET_S=${PEERS_BUDGET_S:-420} STUDY=$STUDY bash benchmarks/torchtitan/device_side_by_side.sh > $OUT/side.log 2>&1
  base=$OUT/results/$STUDY/baselines
  t=$(left 560); echo "Trainer: ${t}s left" >> $OUT/side.log
  if (( t > 60 )); then
    CUDA_VISIBLE_DEVICES=2 timeout -k 10 $t python3 benchmarks/hf_trainer.py --tokens results/h100x2-1b/data/tokens \
      --out $base/hf_trainer_eager.json --steps 16 --warmup 5 > $OUT/hf_eager.log 2>&1 &
    CUDA_VISIBLE_DEVICES=3 timeout -k 10 $t python3 benchmarks/hf_trainer.py --tokens results/h100x2-1b/data/tokens \
      --out $base/hf_trainer_compile.json --steps 16 --warmup 5 --compile > $OUT/hf_compile.log 2>&1 &
    wait
  fi ) &
wait

cp /tmp/o_suite/test_gpu.txt $TOP/ 2>/dev/null
cp /tmp/o_peers/results/$STUDY/baselines/torchtitan_side_by_side/table.txt $TOP/ 2>/dev/null
tar czf $TOP/suite.tgz -C /tmp o_suite
tar czf $TOP/peers.tgz -C /tmp o_peers
tail -5 /tmp/o_suite/main.log
grep -E "passed|failed" /tmp/o_suite/test_gpu.txt | tail -3
cat $TOP/table.txt 2>/dev/null; tail -3 /tmp/o_peers/side.log
for f in /tmp/o_peers/hf_*.log; do echo "== $f"; tail -2 $f | cut -c1-400; done
echo "elapsed $(( $(date +%s) - T0 ))s"
