"""Tensor parallel with PyTorch's ``parallelize_module`` on a 2-D device mesh (dp, tp).

Per decoder layer (Megatron-style, one all-reduce in the forward of attention and one of the MLP):

* ``self_attn.q_proj/k_proj/v_proj`` and ``mlp.gate_proj/up_proj``: ``ColwiseParallel`` (output
  features, i.e. attention heads and MLP columns, split over the tp ranks);
* ``self_attn.o_proj`` and ``mlp.down_proj``: ``RowwiseParallel`` (input features split, the
  partial outputs all-reduced).

The HF attention reshapes with ``view(..., -1, head_dim)``, so each rank simply sees
``num_heads / tp`` query heads and ``num_kv_heads / tp`` KV heads (the GQA group size is unchanged);
no config field needs patching. The token embedding, every RMSNorm weight and ``lm_head`` are
**replicated** on the tp ranks (plain tensors; their gradients are identical on the tp ranks because
the Colwise input all-reduces its gradient). Ranks are laid out tp-innermost (a tp group is
consecutive ranks, i.e. one node), and data parallelism runs over the dp dimension: every rank of a
tp group loads the same batch slice (``dp_rank`` = coordinate on dp) and gradients (the local shards
of DTensor gradients and the replicated ones) are averaged over the dp group after the backward pass.
Clipping computes the global norm from the DTensor shards (:func:`torch_common.clip_grad_norm_`).
"""

from __future__ import annotations

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from llmpar.layout import MeshAxis
from llmpar.strategies.levers import decoder_layers, prepare_model
from llmpar.strategies.torch_common import MeshEngine

COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def layer_plan() -> dict:
    return {**{name: ColwiseParallel() for name in COLWISE}, **{name: RowwiseParallel() for name in ROWWISE}}


def apply_tp(layers, tp_mesh) -> None:
    """Shard the attention and MLP projections of each (unwrapped) decoder layer over ``tp_mesh``."""
    for layer in layers:
        parallelize_module(layer, tp_mesh, layer_plan())


def parallelize(model, spec, ctx, train_cfg) -> MeshEngine:
    tp, dp = spec.tp, spec.dp
    mesh = init_device_mesh(ctx.device.type, (dp, tp), mesh_dim_names=(MeshAxis.DP, MeshAxis.TP))
    apply_tp(decoder_layers(model), mesh[MeshAxis.TP])
    model = prepare_model(model, spec)  # precision / checkpointing / compile wrap the sharded layers
    dp_group = mesh[MeshAxis.DP].get_group()
    engine = MeshEngine(
        model, spec, ctx, train_cfg,
        dp_rank=mesh.get_local_rank(MeshAxis.DP), dp_size=dp, dp_group=dp_group,
        grad_sync_group=dp_group, grad_sync_size=dp,
    )
    engine.hook_replica(mesh.get_local_rank(MeshAxis.TP))  # dp 1: the noise scale per micro-batch
    return engine
