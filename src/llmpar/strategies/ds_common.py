"""DeepSpeed glue shared by the ZeRO, AutoTP and pipeline engines.

* :func:`init_deepspeed` – ``deepspeed.init_distributed`` on the process group the loop already
  created (gloo on CPU, NCCL on GPUs), without JIT-compiling DeepSpeed's shared-memory comm op on CPU.
* :func:`ds_config` – the DeepSpeed config of a run, built from its RunSpec and train config. Batch
  sizes, gradient clipping, ZeRO stage/offload and precision map one to one; what does not map
  (offload without ZeRO, bf16-pure without ZeRO) the config refuses first (``config.resolve_run``).
* :func:`initialize` – ``deepspeed.initialize`` with the *client* optimizer and scheduler of
  :mod:`llmpar.strategies.optim` (AdamW 0.9/0.95, warmup + cosine), so the hyperparameters are the
  ones the torch engines use, not DeepSpeed's config-built ones.
* :class:`DeepSpeedEngine` – the Engine contract over a (non-pipeline) DeepSpeed engine: ZeRO 0-3
  and AutoTP.
* :func:`ds_state_bytes` / :func:`ds_local_param_count` – memory accounting measured from the
  tensors DeepSpeed holds on this rank (also used by the pipeline engine).

Precision. ``precision: bf16`` maps to DeepSpeed's ``torch_autocast`` mode with every gradient
communicated in fp32 (``lower_precision_safe_modules: []``): the module keeps fp32 weights, DeepSpeed
runs its forward under ``torch.autocast(bfloat16)``, gradients are fp32, ZeRO reduces and partitions
them in fp32, and the optimizer updates the fp32 weights (partitions). That is the numerics of the
torch engines (fp32 master weights, bf16 matmuls, fp32 gradient reduction as in DDP; FSDP2 also
reduces in fp32), so every engine trains the same model.

DeepSpeed's own ``bf16`` mode is not used for it: it casts the module's weights to bf16 and builds the
fp32 master copy *from* those bf16 weights, so every master weight starts on the bf16 grid, and an
update smaller than half a bf16 ulp (every update while the LR warms up: 2.7e-5 against a half-ulp of
6e-5 at |w| = 0.02) rounds back to the same bf16 weight in the next forward. Under autocast the fp32
weights sit between grid points and the same update moves about δ/ulp of them by one ulp, i.e. δ on
average. Measured: the first update of the 1.1B model was about half as effective (loss 10.04 instead
of 9.49 at step 2, on one H200 and on 2 x H100), and training stayed behind (4.16 vs 3.62 at step 16).
``precision: bf16-pure`` (bf16 weights, no fp32 master) maps to ``bf16_master_weights_and_grads`` +
``bf16_optimizer_states``, which DeepSpeed only implements for ZeRO stages 1-3; with ZeRO-0 (AutoTP,
pipelines) it is rejected.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from llmpar.errors import ConfigError
from llmpar.layout import Precision
from llmpar.strategies.engine import Engine
from llmpar.strategies.levers import apply_activation_checkpointing, apply_compile, carry_residual_in_bf16
from llmpar.strategies.loss import causal_lm_loss, cross_entropy_for
from llmpar.strategies.optim import make_optimizer, make_scheduler

CHECKPOINT_TAG = "ds"  # DeepSpeed writes <dir>/<tag>/... plus a 'latest' file naming the tag


def init_deepspeed(ctx) -> None:
    """Let DeepSpeed adopt the loop's process group (it calls init_process_group only when none exists).

    On CPU, DeepSpeed's TorchBackend JIT-builds a shared-memory all-reduce op with g++ on first use
    (~27 s, once per TORCH_EXTENSIONS_DIR). Training never needs it: the op only serves
    ``inference_all_reduce``, which falls back to the process group's all_reduce when the op is absent
    (deepspeed/comm/torch.py). ``build_shm_op`` skips the build when the op is marked incompatible in
    ``deepspeed.ops.__compatible_ops__`` (a module-level dict probed once, cheaply), so mark it so.
    """
    import deepspeed

    if ctx.device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=ctx.backend)


def precision_config(spec) -> dict:
    if spec.precision is Precision.FP32:
        return {}
    if spec.precision.autocast:  # bf16 and bf16-residual (whose residual cast is apply_levers')
        # fp32 weights under torch.autocast; no module's gradients are communicated in bf16
        return {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
    if spec.precision is Precision.BF16_PURE:  # needs ZeRO stage 1-3 (checked by config)
        return {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}}
    raise ConfigError(f"run {spec.name}: unknown precision {spec.precision!r}")


def ds_config(spec, train_cfg: dict, model=None) -> dict:
    """The DeepSpeed config of a run. ``model`` (the HF model) sizes ZeRO's buckets and thresholds."""
    zero_stage = spec.zero_stage
    cfg = {
        "train_batch_size": train_cfg["global_batch"],
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.micro_batches,
        # DeepSpeed clips by the global norm over every partition/stage/TP shard; 0 disables it.
        "gradient_clipping": float(train_cfg["grad_clip"]),
        "steps_per_print": 2**31 - 1,  # the loop logs; keep DeepSpeed's own step log quiet
        "wall_clock_breakdown": False,
        # a torch optimizer is used with offload on purpose: same AdamW as every other engine
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": zero_stage},
    }
    cfg.update(precision_config(spec))
    zero = cfg["zero_optimization"]
    if zero_stage >= 1 and model is not None:
        n_params = sum(p.numel() for p in model.parameters())
        # DeepSpeed's default buckets are 5e8 elements; a bucket larger than the model never fills but
        # is still allocated (ZeRO-2's contiguous-gradient buffer, ZeRO-3's reduce bucket), so cap them
        # at the model size. The reduced values are the same; only the grouping of collectives changes.
        bucket = int(min(5e8, n_params))
        zero.update({"reduce_bucket_size": bucket, "allgather_bucket_size": bucket})
        if zero_stage == 3:
            # ZeRO-3 keeps parameters below stage3_param_persistence_threshold (default 1e5 elements)
            # gathered on every rank. Every matrix of the tiny test model is below that, so the default
            # would partition nothing. The hidden size keeps only vectors (norms) persistent; for the
            # 1B model (hidden 2048, matrices >= 2048x256) this is the same split as the default.
            zero.update({
                "stage3_param_persistence_threshold": int(model.config.hidden_size),
                "stage3_prefetch_bucket_size": bucket,
            })
    if spec.offload in ("optimizer", "parameters"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if spec.offload == "parameters":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return cfg


def apply_levers(model, spec, in_place: bool = True) -> None:
    """The bf16 residual stream, activation checkpointing and compile on the HF decoder layers (autocast is
    DeepSpeed's job). ``in_place``: compile each layer in place (ZeRO and AutoTP, :func:`apply_compile`); the
    pipeline engine's layer specs take the compiled wrappers instead."""
    if spec.precision is Precision.BF16_RESIDUAL:
        carry_residual_in_bf16(model)
    apply_activation_checkpointing(model, spec.activation_checkpointing)
    apply_compile(model, spec.compile, in_place=in_place, mode=spec.compile_mode)


def initialize(module, config: dict, train_cfg: dict, mpu=None):
    """deepspeed.initialize with the shared AdamW and LR schedule, built on the parameters DeepSpeed
    hands back after its own module surgery (AutoTP shards) – hence callables, not instances."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=module,
        optimizer=lambda params: make_optimizer(params, train_cfg),
        lr_scheduler=lambda opt: make_scheduler(opt, train_cfg),
        config=config,
        mpu=mpu,
    )
    use_safe_checkpoint_loader(engine)
    return engine


def safe_checkpoint_engine_class():
    """DeepSpeed's torch checkpoint engine with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19's TorchCheckpointEngine loads with ``weights_only=False`` (full pickle: a
    checkpoint file could run code). Its checkpoints hold tensors, containers, strings and numbers
    plus a few DeepSpeed objects, which are allow-listed by name below; anything else is refused
    with torch's UnpicklingError naming the global.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine


def _deepspeed_checkpoint_globals() -> list:
    """The non-tensor objects DeepSpeed puts in its checkpoints: found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on the checkpoints of ZeRO-1/2/3 (with and
    without offload), AutoTP (fp32, bf16) and the pipeline (alone and with ZeRO-1)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def use_safe_checkpoint_loader(engine) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}: "
                           "its loader is not known to be safe")
    engine.checkpoint_engine = safe_checkpoint_engine_class()(engine._config)


# --------------------------------------------------------------------------- accounting


def _storages(tensors, seen: set) -> int:
    """Bytes of the storages behind ``tensors`` not already in ``seen`` (views count once)."""
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.dim() == 0:  # skip scalars (norms, flags)
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), str(t.device))
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def _tensors_in(obj, depth: int = 3):
    """Tensors reachable from ``obj`` through lists, tuples and dicts (not through other objects)."""
    if torch.is_tensor(obj):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors_in(x, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors_in(x, depth - 1)


def ds_state_bytes(engine) -> dict[str, int]:
    """Parameters, gradients and optimizer state this rank holds, measured from DeepSpeed's tensors.

    Each storage is counted once, in the first category that reaches it (views into DeepSpeed's flat
    buffers are deduplicated). Offloaded tensors (host memory) are included.

    * params: the module's parameter data and, under ZeRO-3, each parameter's partition ``ds_tensor``
      (the gathered ``data`` is empty when released; persistent small parameters are held in full).
    * optimizer: the tensors of the inner torch optimizer's state (Adam moments) and its parameters,
      which under ZeRO / DeepSpeed bf16 are the fp32 master (partitions), plus every other tensor
      attribute of the ZeRO/bf16 optimizer wrapper whose name mentions fp32 or master (and not grad).
    * grads: ``.grad`` of module parameters and master parameters, plus every tensor attribute of the
      optimizer wrapper whose name mentions grad or ipg (ZeRO's partitioned-gradient and bucket
      buffers, e.g. ``averaged_gradients``, ``ipg_buffer``, ``grad_partitions_flat_buffer``, and
      BF16_Optimizer's fp32 gradient accumulators ``fp32_groups_gradients_flat``).
    """
    seen: set = set()
    params = list(engine.module.parameters())
    out = {"params": 0, "grads": 0, "optimizer": 0}
    out["params"] = _storages(
        [p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params], seen)
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper) if wrapper is not None else None
    opt_tensors, grad_tensors = [], [p.grad for p in params]
    if inner is not None:
        for state in inner.state.values():
            opt_tensors.extend(v for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        for group in inner.param_groups:
            opt_tensors.extend(group["params"])
            grad_tensors.extend(p.grad for p in group["params"])
    if wrapper is not None and wrapper is not inner:
        for name, value in vars(wrapper).items():
            lname = name.lower()
            if "grad" in lname or "ipg" in lname:  # e.g. BF16_Optimizer's fp32_groups_gradients_flat
                grad_tensors.extend(_tensors_in(value))
            elif "fp32" in lname or "master" in lname:
                opt_tensors.extend(_tensors_in(value))
    out["optimizer"] = _storages(opt_tensors, seen)
    out["grads"] = _storages(grad_tensors, seen)
    return out


def ds_torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that applies the update: inside DeepSpeed's ZeRO / bf16 wrapper, or the
    engine's optimizer itself when it has none."""
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside DeepSpeed's {type(wrapper).__name__}")
    return inner


def keep_clip_norm(engine) -> None:
    """Keep the gradient norm DeepSpeed's fp32 clipping computes, for ``get_global_grad_norm()``.

    A ZeRO or bf16 optimizer wrapper keeps its norm there by itself. Without one (AutoTP, the pipeline
    without ZeRO: the torch optimizer is stepped directly) DeepSpeed clips in
    ``engine.clip_fp32_gradients`` with ``deepspeed.runtime.utils.clip_grad_norm_`` (global over the
    model-parallel and data-parallel groups) and drops the norm it returns, so that call is replaced by
    the same call that keeps it.
    """
    if engine.optimizer is not ds_torch_optimizer(engine):
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_fp32_gradients


def ds_local_param_count(engine) -> int:
    """Parameter elements this rank holds: the ZeRO-3 partition (plus any gathered/persistent full
    copy), else the (possibly TP-sharded or stage-local) parameter itself."""
    total = 0
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel() + p.data.numel()
        else:
            total += p.numel()
    return total


# --------------------------------------------------------------------------- engine


class DeepSpeedEngine(Engine):
    """A non-pipeline DeepSpeed engine (ZeRO 0-3, AutoTP) stepped with forward / backward / step.

    ``engine.backward`` scales each micro-batch loss by 1/gradient_accumulation_steps and reduces
    gradients over the engine's data-parallel group (ZeRO: reduce-scatter into partitions, at the
    accumulation boundary or overlapped in backward); ``engine.step`` only steps the optimizer (with
    clipping and the LR scheduler) at the boundary, i.e. after the last micro-batch.

    Noise scale: DeepSpeed offers no hook on a replica's own gradient before its reduction, so on measured
    steps a tensor hook on every parameter adds the squared norm of the gradient autograd hands it (this
    rank's, this micro-batch's, before DeepSpeed's accumulate-grad hooks see it;
    :class:`~llmpar.strategies.replica_norm.GradNormHooks`). As for FSDP2 the small batch is one micro-batch
    (``noise.splits``); under AutoTP the tensor-parallel ranks' parts are summed (``hook_grad_norms``).
    """

    def __init__(self, engine, spec, ctx, train_cfg):
        dp_group = engine.data_parallel_group
        super().__init__(spec, ctx, train_cfg, dp_group=dp_group, dp_size=engine.dp_world_size,
                         dp_rank=dist.get_rank(group=dp_group) if dp_group is not None else ctx.rank)
        self.engine = engine
        if engine.gradient_accumulation_steps() != spec.micro_batches:
            raise ConfigError(f"run {spec.name}: DeepSpeed accumulates {engine.gradient_accumulation_steps()} "
                              f"micro-batches, the run asks for {spec.micro_batches}")
        self.loss_fn = cross_entropy_for(ctx.device, train_cfg["fused_loss"])
        self.watch_optimizer(ds_torch_optimizer(engine))
        keep_clip_norm(engine)
        self.hook_grad_norms()

    def hook_grad_norms(self, group=None) -> None:
        """The noise scale's per-micro-batch gradient hooks (class docstring) on this rank's parameters;
        ``group``: the ranks holding the other parts of this rank's replica (a pipeline's stages).

        AutoTP: the ranks of a tensor-parallel group hold one replica. DeepSpeed marks the slices it cut
        (``tensor_model_parallel``, set by its ``TensorParallel_Layer``s); every other parameter is whole
        on each of them with the same gradient, so only tp rank 0 hooks it, and the group sums the parts."""
        params = list(self.engine.module.parameters())
        if self.spec.tp > 1:
            from deepspeed.utils import groups

            group = groups.get_tensor_model_parallel_group()
            first = groups.get_tensor_model_parallel_rank() == 0
            params = [p for p in params if getattr(p, "tensor_model_parallel", False) or first]
        self.hook_micro_batches(params, group)

    def train_step(self, micro_batches):
        # Timed with host clocks around forward / backward / step (exact on CPU; CUDA events on GPUs). Under
        # ZeRO-2/3 the gradient reduce-scatter runs inside backward, as DDP's all-reduce does.
        n = len(micro_batches)
        total = torch.zeros((), device=self.ctx.device)
        for x, y in micro_batches:
            self.timer.start()
            loss = causal_lm_loss(self.engine, x, y, self.loss_fn)
            self.timer.stop("forward")
            self.engine.backward(loss)
            self.timer.stop("backward")
            self.capture_states()
            self.engine.step()  # optimizer step at the accumulation boundary only (bookkeeping otherwise)
            self.timer.stop("optimizer")
            total += loss.detach().float()
        self.take_micro_batch_norms(n)  # DeepSpeed divides each micro-batch's loss by n before its backward
        return self._reduce_mean(total / n)

    @torch.no_grad()
    def eval_loss(self, inputs, labels):
        self.engine.eval()
        loss = causal_lm_loss(self.engine, inputs, labels, self.loss_fn).float()
        self.engine.train()
        if self.engine.zero_optimization_stage() == 3:
            # ZeRO-3's inference-mode parameter coordinator leaves the gathered parameters cached after an
            # eval forward; release them so evaluation does not turn ZeRO-3 into a full replica.
            self.engine.empty_partition_cache()
        return self._reduce_mean(loss)

    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def grad_norm(self):
        """The norm DeepSpeed clipped the last step with (its optimizer wrapper's, or see keep_clip_norm)."""
        return self.engine.get_global_grad_norm() if self.train_cfg["grad_clip"] > 0 else None

    def model_state_bytes(self) -> dict[str, int]:
        return ds_state_bytes(self.engine)

    def close(self) -> None:
        from deepspeed.utils import groups

        self.engine.destroy()  # DeepSpeed's own teardown (ZeRO-3 hooks and partition buffers)
        # DeepSpeed keeps an engine's model-parallel unit (a pipeline grid, AutoTP's (data, tensor) mesh)
        # in these globals; a later engine of the same process (a batch of runs) that has none would
        # take its data-parallel group from them ("'NoneType' object has no attribute
        # 'get_model_parallel_rank'" after a pipeline run).
        groups.mpu = None
        groups.mesh_device = None

    def local_param_count(self) -> int:
        return ds_local_param_count(self.engine)

    # DeepSpeed's own format: <path>/ds/mp_rank_*_model_states.pt (+ ZeRO optimizer partitions per
    # rank), the LR scheduler inside; read back through SafeTorchCheckpointEngine (weights_only=True).
    def save_checkpoint(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG)

    def load_checkpoint(self, path: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path}/{CHECKPOINT_TAG}")
