"""Pipeline parallel with DeepSpeed's ``PipelineModule`` / ``PipelineEngine`` (1F1B), and pipeline x data.

The HF model the loop built is cut into a list of layers that pass one tensor between stages:
``embedding -> decoder layer x L -> final norm + lm_head``. The layers wrap the model's own modules
(same weights, nothing re-initialized); the rotary embeddings and the causal mask, which LlamaModel
computes once per forward, are recomputed inside each decoder-layer wrapper with the same HF
functions. DeepSpeed assigns the layers to stages balancing their parameter counts
(``partition_method="parameters"``; the embedding and the head count like any layer), keeps only
this stage's layers, and the modules of the other stages are released from this rank (moved to the
meta device).

Schedule: DeepSpeed's ``TrainSchedule`` (1F1B: each stage runs at most ``stages - stage_id``
micro-batches ahead before alternating forward and backward). GPipe and interleaved 1F1B exist in
the torch engine (``pp_engine: torch``) only.

Layout: ``PipeDataParallelTopology(num_pp=stages, num_dp=dp)``, axes (pipe, data), so
rank = stage * dp + dp_index: the data-parallel replicas of one stage are consecutive ranks (on one
node when gpus_per_node >= dp) and pipeline sends cross between those blocks. Every stage of one
pipeline has the same data-parallel index and loads the same slice of the global batch (only the
first stage reads inputs and the last stage labels). ZeRO-1 (strategy zero with stages > 1)
partitions each stage's optimizer state over its dp replicas; ZeRO-2/3 are rejected by DeepSpeed.

Not supported (the config refuses it, ``config.resolve_run``): AutoTP inside the stages (3D).
DeepSpeed's AutoTP builds its own (data, tensor) device mesh over the whole world
(``deepspeed.utils.groups._init_tp_mesh_device``) and replaces the engine's ``mpu`` with it, while the
PipelineEngine takes its data-parallel and pipe groups from the PipelineModule's grid; the two cannot be
combined. DeepSpeed's pipeline only composes with a Megatron-style ``PipeModelDataParallelTopology``
whose tensor-parallel layers the model implements itself. Use ``pp_engine: torch`` for pipeline x tensor
parallelism.
"""

from __future__ import annotations

import torch
from torch import nn

from llmpar.errors import ConfigError
from llmpar.model import decoder_layer_kwargs
from llmpar.strategies import ds_common
from llmpar.strategies.engine import Engine
from llmpar.strategies.levers import decoder_layers
from llmpar.strategies.loss import cross_entropy_for


class EmbeddingStage(nn.Module):
    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)

    def owned(self):
        return [self.embed_tokens]


class DecoderStage(nn.Module):
    """One HF decoder layer; recomputes what LlamaModel.forward computes once for all layers."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, config):
        super().__init__()
        self.layer = layer
        self.rotary_emb = rotary_emb  # the model's own (buffers only, shared by all wrappers)
        self.config = config

    def forward(self, hidden_states):
        return self.layer(hidden_states, **decoder_layer_kwargs(self.config, self.rotary_emb, hidden_states))

    def owned(self):
        return [self.layer]


class HeadStage(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden_states):
        return self.lm_head(self.norm(hidden_states))

    def owned(self):
        return [self.norm, self.lm_head]


def pipeline_layers(model) -> list[nn.Module]:
    inner = model.model
    return ([EmbeddingStage(inner.embed_tokens)]
            + [DecoderStage(layer, inner.rotary_emb, model.config) for layer in decoder_layers(model)]
            + [HeadStage(inner.norm, model.lm_head)])


def parallelize(model, spec, ctx, train_cfg):
    ds_common.init_deepspeed(ctx)
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    ds_common.apply_levers(model, spec, in_place=False)
    layers = pipeline_layers(model)
    module = PipelineModule(
        layers=layers,
        topology=PipeDataParallelTopology(num_pp=spec.stages, num_dp=spec.dp),
        loss_fn=cross_entropy_for(ctx.device, train_cfg["fused_loss"]),  # the loss of every engine
        partition_method="parameters",
    )
    # Release the other stages' modules: the loop still references the full HF model.
    for i, layer in enumerate(layers):
        if not module._local_start <= i < module._local_stop:
            for owned in layer.owned():
                owned.to("meta")
    # DeepSpeed's gradient-norm (clip_grad_norm_, and the ZeRO-1 optimizer's norm) sums a parameter's
    # norm on model-parallel rank 0 only unless the parameter is marked model-parallel (Megatron's
    # convention: unmarked parameters are replicated over tensor-parallel ranks). In a PipelineModule's
    # grid the "model-parallel" group is the whole pipeline (rank = stage), so unmarked, the global norm
    # would cover stage 0 only and clipping would scale every stage by a wrong coefficient (measured:
    # losses 5e-4 off the baseline after 4 steps with grad_clip 1.0). No parameter here is replicated
    # across stages (the embedding and lm_head are untied), so mark all of them.
    for p in module.parameters():
        p.model_parallel = True
    config = ds_common.ds_config(spec, train_cfg, model=module)
    engine = ds_common.initialize(module, config, train_cfg)
    return DeepSpeedPipelineEngine(engine, spec, ctx, train_cfg)


class DeepSpeedPipelineEngine(ds_common.DeepSpeedEngine):
    def __init__(self, engine, spec, ctx, train_cfg):
        grid = engine.grid
        # the contract's state only: DeepSpeedEngine.__init__ assumes a non-pipeline engine's groups
        Engine.__init__(self, spec, ctx, train_cfg, dp_rank=grid.get_data_parallel_rank(),
                        dp_size=grid.get_data_parallel_world_size(), dp_group=grid.get_data_parallel_group())
        self.engine = engine
        self.stage_id = grid.get_stage_id()
        if engine.micro_batches != spec.micro_batches:
            raise ConfigError(f"run {spec.name}: DeepSpeed pipelines {engine.micro_batches} micro-batches, "
                              f"the run asks for {spec.micro_batches}")
        self.watch_optimizer(ds_common.ds_torch_optimizer(engine))
        ds_common.keep_clip_norm(engine)  # the phase timer stays unused: see time_breakdown
        # noise scale as in ds_common.DeepSpeedEngine, the stages' squared norms summed over the pipeline: a
        # replica's gradient spans every stage
        self.hook_grad_norms(grid.get_pipe_parallel_group())

    def train_step(self, micro_batches):
        if len(micro_batches) != self.engine.micro_batches:
            raise ValueError(f"expected {self.engine.micro_batches} micro-batches, got {len(micro_batches)}")
        # train_batch: the 1F1B schedule, DP gradient all-reduce, clipping, AdamW and LR step; it returns
        # the loss averaged over micro-batches and DP replicas, broadcast from the last stage to all.
        loss = self.engine.train_batch(data_iter=iter(micro_batches))
        self.take_micro_batch_norms(len(micro_batches))  # DeepSpeed divides each micro-batch's loss by m
        return loss.reshape(())

    @torch.no_grad()
    def eval_loss(self, inputs, labels):
        # Same micro-batch shape as training: DeepSpeed caches the inter-stage activation shapes.
        m = self.engine.micro_batches
        batches = list(zip(inputs.chunk(m), labels.chunk(m)))
        loss = self.engine.eval_batch(iter(batches), num_micro_batches=len(batches))
        return loss.float().reshape(())

    def time_breakdown(self):
        # None: 1F1B interleaves the forward and backward of different micro-batches with blocking
        # sends/receives inside one train_batch call, so forward/backward/optimizer phases are not
        # separable from outside; DeepSpeed's own wall_clock_breakdown timers synchronize the device
        # around every pipeline instruction, which would change what is being measured.
        return None
