#!/usr/bin/env python
"""torchtitan 0.2.2's command line for the study's setting (configs/gpu2-1b.yaml), one flag a line:

    mapfile -t TT_FLAGS < <(python benchmarks/torchtitan/flags.py NGPU STEPS ASSETS DATA DUMP)

Model llama3/llmpar_1b (registered by tt_launch.py), sequence 2048, local batch 16 per GPU and global batch
32 (1 GPU: 2 accumulation steps, like our `single`; 2 GPUs: FSDP over both, 1 step, like our `fsdp`), bf16
mixed precision (1 GPU: autocast over fp32 weights; FSDP: bf16 all-gathered parameters, fp32 gradient
reduction), AdamW fused (0.9/0.95, eps 1e-8, no weight decay), clipping 1.0, lr 3e-4 with 10 linear warm-up
steps then cosine to 0.1 x lr (our schedule's class), torch.compile of each block and of the loss, no
activation checkpointing, plain causal SDPA (the flavor's attn_mask_type "causal", not document masking), no
checkpoints, no validation, metrics every 10 steps. Every option is a flag: the 0.2.2 wheel ships no TOML
files. TT_LOCAL_BATCH (default 16) is only a fallback for a card where 16 does not fit; the result JSON
records the batch that ran (trainer_logged).
"""

import os
import sys


def tt_flags(ngpu: int, steps: int, assets: str, data: str, dump: str, local_batch: int = 16) -> list[str]:
    return [
        "--job.dump_folder", dump,
        "--model.name", "llama3", "--model.flavor", "llmpar_1b", "--model.hf_assets_path", assets,
        "--training.dataset", "c4_test", "--training.dataset_path", data,
        "--training.local_batch_size", str(local_batch), "--training.global_batch_size", "32",
        "--training.seq_len", "2048", "--training.steps", str(steps), "--training.max_norm", "1.0",
        "--training.mixed_precision_param", "bfloat16", "--training.mixed_precision_reduce", "float32",
        "--parallelism.data_parallel_shard_degree", str(ngpu),
        "--optimizer.name", "AdamW", "--optimizer.lr", "3e-4", "--optimizer.beta1", "0.9",
        "--optimizer.beta2", "0.95", "--optimizer.eps", "1e-8",
        "--optimizer.weight_decay", "0.0", "--optimizer.implementation", "fused",
        "--lr_scheduler.warmup_steps", "10", "--lr_scheduler.decay_type", "cosine",
        "--lr_scheduler.min_lr_factor", "0.1",
        "--compile.enable", "--compile.components", "model,loss", "--activation_checkpoint.mode", "none",
        "--metrics.log_freq", "10", "--metrics.disable_color_printing",
        "--debug.seed", "1234",
    ]


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(f"usage: {sys.argv[0]} NGPU STEPS ASSETS DATA DUMP")
    ngpu, steps, assets, data, dump = sys.argv[1:]
    print("\n".join(tt_flags(int(ngpu), int(steps), assets, data, dump, int(os.environ.get("TT_LOCAL_BATCH", 16)))))
