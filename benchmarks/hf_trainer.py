"""What a user would pick instead: Hugging Face ``Trainer`` on the same 1.1B Llama, global batch and
sequence length as the study's ``single`` run, timed the same way (steady-state steps only).

    python benchmarks/hf_trainer.py --tokens results/h200-1b/data/tokens --out trainer.json [--compile]

Same model (llmpar.model.llama_config: hidden 2048, 22 layers, 32/4 heads, SwiGLU 5632, vocabulary
32000, SDPA attention, fp32 weights), same data (the study's token shards), global batch 32 x 2048
(per-device 8, gradient accumulation 4), ``bf16=True`` (autocast with fp32 master weights), the
Trainer's default optimizer, grad clipping 1.0, the study's learning rate and warm-up. Nothing else
is tuned: that is the point of the comparison. ``--compile`` sets ``torch_compile=True``.

Throughput: a callback records a CUDA event at the end of every optimizer step; tokens/s is the
tokens of the steps after the first ``--warmup`` divided by their summed event times (the study's
definition). MFU uses the study's FLOPs per token and peak.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmpar.data.tokenize import read_meta  # noqa: E402
from llmpar.metrics.definitions import peak_flops_for  # noqa: E402
from llmpar.model import llama_config  # noqa
from llmpar.shape import flops_per_token  # noqa: E402


class Sequences(torch.utils.data.Dataset):
    """Sequence i of the packed training shard, as the study's loader cuts it."""

    def __init__(self, tokens_dir, seq_len):
        meta = read_meta(tokens_dir)
        self.tokens = np.memmap(Path(tokens_dir) / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        self.s = seq_len
        self.n = (len(self.tokens) - 1) // seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.from_numpy(np.asarray(self.tokens[i * self.s : (i + 1) * self.s], dtype=np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def main():
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the throughput")
    p.add_argument("--per-device", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--size", default="1B", help="model size preset (tiny for a CPU smoke test)")
    a = p.parse_args()
    if torch.cuda.device_count() > 1 and "LOCAL_RANK" not in os.environ:
        # one process seeing several GPUs: the Trainer would wrap the model in nn.DataParallel and
        # split each batch over all of them, which is not the one-GPU baseline this script measures
        p.error(f"{torch.cuda.device_count()} GPUs visible: set CUDA_VISIBLE_DEVICES to one GPU")

    mc = {"size": a.size, "seq_len": a.seq_len, "vocab_size": 32000}
    vocab = read_meta(a.tokens)["vocab_size"]
    cfg = llama_config(mc, vocab)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(1234)
    t0 = time.time()
    model = LlamaForCausalLM(cfg)

    events: list[torch.cuda.Event] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not events:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                events.append(ev)

        def on_step_end(self, args, state, control, **kw):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append(ev)

    args = TrainingArguments(
        output_dir="/tmp/hf_trainer_out",
        per_device_train_batch_size=a.per_device,
        gradient_accumulation_steps=a.global_batch // a.per_device,
        max_steps=a.steps,
        learning_rate=3e-4,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=True,
        torch_compile=a.compile,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=2,
        dataloader_pin_memory=True,
        seed=1234,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Sequences(a.tokens, a.seq_len), callbacks=[Timer()])
    torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    torch.cuda.synchronize()
    wall = time.time() - t0
    times = [events[i].elapsed_time(events[i + 1]) / 1000 for i in range(len(events) - 1)]
    steady = times[a.warmup:]
    tokens_per_step = a.global_batch * a.seq_len
    tps = len(steady) * tokens_per_step / sum(steady)
    fpt = flops_per_token(mc, vocab)
    name = torch.cuda.get_device_name(0)
    peak = peak_flops_for(name, None)
    row = {
        "kind": "hf_trainer",
        "compile": a.compile,
        "optim": str(args.optim),
        "steps": a.steps,
        "steady_steps": len(steady),
        "step_time_s": times,
        "tokens_per_s": tps,
        "mfu": tps * fpt / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "train_loss": result.training_loss,
        "wall_s": wall,
        "gpu": name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    Path(a.out).write_text(json.dumps(row, indent=1))
    print(json.dumps({k: v for k, v in row.items() if k != "step_time_s"}), flush=True)


if __name__ == "__main__":
    main()
