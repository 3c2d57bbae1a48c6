"""torchtitan 0.2.2's own trainer (``torchtitan.train``) on the study's model shape, started by torchrun:

    torchrun --standalone --nproc_per_node N benchmarks/torchtitan/tt_launch.py --model.flavor llmpar_1b ...

Before ``torchtitan.train`` runs as ``__main__`` this process

* registers the flavor ``llmpar_1b``: hidden 2048, 22 layers, 32 heads, 4 KV heads, SwiGLU width 5632
  (torchtitan derives it: int(2 * 4 * 2048 / 3) = 5461, rounded up to a multiple of 256), vocabulary
  32000, RMSNorm eps 1e-5, plain RoPE with theta 10000 (llama3's default RoPE scaling is switched off
  with scaling_factor 1, as in our Hugging Face Llama), no weight tying: 1,100,048,384 parameters,
  the count of llmpar.model.param_counts. torchtitan 0.2.2 takes the vocabulary from the flavor, not
  from the tokenizer (TransformerModelArgs.update_from_config only sets max_seq_len), so the
  embedding has 32000 rows whatever the tokenizer holds, as our model pads it;
* shifts the logging phase (TT_ALIGN_WARMUP=W, default 5): torchtitan logs at step 1 and every
  log_freq steps, and each logged tokens/s covers the steps since the previous log. With W the logged
  steps are 1, W, W + log_freq, W + 2·log_freq, ..., so the windows after step W are exactly our
  steady steps (W+1 .. steps, e.g. 6-15, 16-25, 26-35, 36-45). The cadence stays one host sync every
  log_freq steps; nothing else in the step changes;
* keeps the peak of torch.cuda.max_memory_allocated / max_memory_reserved over the whole run (torchtitan
  resets the peak at every log) and prints it at exit as one ``[llmpar] memory {...}`` JSON line,
  so the peak can be compared with ours (max_memory_allocated over the run);
* stands in an empty ``torch.utils.tensorboard`` when the tensorboard package is missing (its metrics
  module imports SummaryWriter at import time; --metrics.enable_tensorboard stays off here).

``TT_CHECK=1``: no training; parse the command line with torchtitan's ConfigManager, build the model on
the meta device and print ``[llmpar] check {...}`` (parameter count, torchtitan's FLOPs per token, the
first tokens of the first sample). Runs on a CPU machine (benchmarks/torchtitan/check_cpu.sh).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import types

FLAVOR = "llmpar_1b"


def register_flavor() -> None:
    from torchtitan.models.llama3 import llama3_args
    from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs

    llama3_args[FLAVOR] = TransformerModelArgs(
        dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256,
        ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=10000,
        rope_scaling_args=RoPEScalingArgs(scaling_factor=1.0), attn_type="sdpa", attn_mask_type="causal",
    )


def stub_tensorboard_if_missing() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as exc:
        print(f"[llmpar] tensorboard not importable ({exc}); torch.utils.tensorboard stubbed "
              "(metrics.enable_tensorboard is off)", flush=True)
        stub = types.ModuleType("torch.utils.tensorboard")
        stub.SummaryWriter = None
        sys.modules["torch.utils.tensorboard"] = stub


def align_logging(warmup: int) -> None:
    from torchtitan.components.metrics import MetricsProcessor

    def should_log(self, step: int) -> bool:
        freq = self.job_config.metrics.log_freq
        return step == 1 or step == warmup or (step > warmup and (step - warmup) % freq == 0)

    MetricsProcessor.should_log = should_log


def track_memory_peak() -> None:
    import torch
    from torchtitan.components.metrics import DeviceMemoryMonitor

    peak = {"max_allocated_gib": 0.0, "max_reserved_gib": 0.0, "max_active_gib": 0.0}

    def record():
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        stats = torch.cuda.memory_stats()
        gib = 2.0**30
        peak["max_allocated_gib"] = max(peak["max_allocated_gib"], torch.cuda.max_memory_allocated() / gib)
        peak["max_reserved_gib"] = max(peak["max_reserved_gib"], torch.cuda.max_memory_reserved() / gib)
        peak["max_active_gib"] = max(peak["max_active_gib"], stats.get("active_bytes.all.peak", 0) / gib)

    original = DeviceMemoryMonitor.reset_peak_stats

    def reset_peak_stats(self):
        record()
        original(self)

    DeviceMemoryMonitor.reset_peak_stats = reset_peak_stats

    def report():
        record()
        peak["rank"] = int(os.environ.get("RANK", "0"))
        print("[llmpar] memory " + json.dumps(peak), flush=True)

    atexit.register(report)


def check(argv: list[str]) -> None:
    """Parse the flags and build the model on the meta device (no GPU, no training)."""
    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.protocols import train_spec as train_spec_module

    cfg = ConfigManager().parse_args(argv)
    spec = train_spec_module.get_train_spec(cfg.model.name)
    args = spec.model_args[cfg.model.flavor]
    args.update_from_config(cfg)
    with torch.device("meta"):
        model = spec.model_cls(args)
    nparams, flops = args.get_nparams_and_flops(model, cfg.training.seq_len)
    tokenizer = spec.build_tokenizer_fn(cfg)
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    ds = HuggingFaceTextDataset(cfg.training.dataset, cfg.training.dataset_path, tokenizer,
                                seq_len=cfg.training.seq_len)
    sample, label = next(iter(ds))
    out = {
        "params": nparams, "flops_per_token": flops, "vocab_size": args.vocab_size,
        "ffn_hidden": model.layers["0"].feed_forward.w1.out_features,
        "tokenizer_vocab": tokenizer.get_vocab_size(), "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
        "first_tokens": sample["input"][:16].tolist(), "sample_len": int(sample["input"].numel()),
        "local_batch_size": cfg.training.local_batch_size, "global_batch_size": cfg.training.global_batch_size,
        "steps": cfg.training.steps, "log_freq": cfg.metrics.log_freq, "compile": cfg.compile.enable,
        "compile_components": cfg.compile.components, "ac": cfg.activation_checkpoint.mode,
        "lr": cfg.optimizer.lr, "warmup": cfg.lr_scheduler.warmup_steps, "decay": cfg.lr_scheduler.decay_type,
        "min_lr_factor": cfg.lr_scheduler.min_lr_factor, "weight_decay": cfg.optimizer.weight_decay,
        "dp_shard": cfg.parallelism.data_parallel_shard_degree,
        "mixed_precision_param": cfg.training.mixed_precision_param,
    }
    print("[llmpar] check " + json.dumps(out), flush=True)


def main() -> None:
    stub_tensorboard_if_missing()
    register_flavor()
    if os.environ.get("TT_CHECK"):
        check(sys.argv[1:])
        return
    align_logging(int(os.environ.get("TT_ALIGN_WARMUP", "5")))
    track_memory_peak()
    sys.argv[0] = "torchtitan.train"
    runpy.run_module("torchtitan.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
