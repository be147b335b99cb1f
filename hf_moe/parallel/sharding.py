"""Sharding a model's experts over an expert-parallel group: plain local parameters, no DTensor."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from ..moe.dispatch import AllToAllDispatcher
from ..moe.layer import HfMoeSparseMoeBlock
from .groups import ExpertParallelGroups


def is_expert_parameter(name: str) -> bool:
    """Parameters that live on one EP rank only: the routed experts' weights (and adapters on them)."""
    return ".mlp.experts." in name or name.startswith("mlp.experts.")


def expert_parallelize(model: nn.Module, groups: ExpertParallelGroups, global_aux_loss: bool = True) -> nn.Module:
    """Keep this rank's E/P experts in every MoE block and route tokens through all-to-all.

    Works on a model whose experts are full (sliced here) or already local-sized (sharded loading). Sets
    `model._ddp_params_and_buffers_to_ignore` so that DDP (accelerate's `prepare`) leaves the expert weights to
    `finish_gradients`. With `global_aux_loss`, the load-balancing loss is taken over every rank's tokens.
    """
    for block in (m for m in model.modules() if isinstance(m, HfMoeSparseMoeBlock)):
        experts = block.experts
        num_experts = block.router.num_experts
        start, end = groups.expert_range(num_experts)
        if experts.num_experts == num_experts:
            experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.data[start:end].clone())
            experts.down_proj = nn.Parameter(experts.down_proj.data[start:end].clone())
        elif experts.num_experts != end - start:
            raise ValueError(f"experts hold {experts.num_experts} experts; expected {num_experts} (full) or "
                             f"{end - start} (this rank's shard).")
        experts.num_experts = end - start
        block.expert_parallel = AllToAllDispatcher(groups.ep_group, num_experts)
        block.router.aux_loss_group = dist.group.WORLD if global_aux_loss else None
    model._hf_moe_expert_parallel = groups
    return prepare_for_ddp(model)


def prepare_for_ddp(model: nn.Module) -> nn.Module:
    """Tell DDP to leave expert parameters alone (`finish_gradients` syncs them). Call again after wrapping the
    model (e.g. with PEFT) and before `accelerator.prepare`, so the names match the wrapper's."""
    model._ddp_params_and_buffers_to_ignore = [n for n, _ in model.named_parameters() if is_expert_parameter(n)]
    return model
