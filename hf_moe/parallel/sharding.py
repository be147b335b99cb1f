"""Sharding a model's experts over an expert-parallel group: plain local parameters, no DTensor."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from ..moe.block import expert_modules, moe_blocks
from .all_to_all import AllToAllDispatcher
from .collectives import all_reduce_sum
from .groups import ExpertParallelGroups


def expert_parallelize(
    model: nn.Module,
    groups: ExpertParallelGroups,
    global_aux_loss: bool = True,
    overlap_weight_grads: bool = False,
    padded_dispatch: bool = False,
) -> nn.Module:
    """Keep this rank's E/P experts in every MoE block and route tokens through all-to-all.

    Works on a model whose experts are full (sliced here) or already local-sized (sharded loading). Sets
    `model._ddp_params_and_buffers_to_ignore` so that DDP (accelerate's `prepare`) leaves the expert weights to
    `finish_gradients`. With `global_aux_loss`, the load-balancing loss is taken over every rank's tokens. With
    `overlap_weight_grads`, backward computes the experts' weight gradients while the token all-to-alls travel
    (they are accumulated into `.grad` outside autograd, so tensor hooks on expert weights do not fire); off by
    default, as it did not pay on NVLink-connected GPUs (see `AllToAllDispatcher`). With `padded_dispatch`, every
    token goes to every rank of its group with equal splits, so the forward pass has no host sync; every rank must
    then feed the same number of tokens (see `AllToAllDispatcher`).
    """
    for block in moe_blocks(model):
        experts = block.experts
        num_experts = block.router.num_experts
        start, end = groups.expert_range(num_experts)
        if experts.num_experts == num_experts:
            experts.keep(start, end)
        elif experts.num_experts != end - start:
            raise ValueError(f"experts hold {experts.num_experts} experts; expected {num_experts} (full) or "
                             f"{end - start} (this rank's shard).")
        block.set_dispatcher(AllToAllDispatcher(
            groups.ep_group, num_experts, overlap_weight_grads=overlap_weight_grads, padded=padded_dispatch
        ))
        block.router.set_loss_reduction(
            functools.partial(all_reduce_sum, group=dist.group.WORLD) if global_aux_loss else None
        )
    model._hf_moe_expert_parallel = groups
    return prepare_for_ddp(model)


def expert_parallel_groups(model: nn.Module) -> ExpertParallelGroups | None:
    """The groups `expert_parallelize` attached to `model` (looks through DDP / PEFT wrappers)."""
    for module in model.modules():
        groups = getattr(module, "_hf_moe_expert_parallel", None)
        if groups is not None:
            return groups
    return None


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names (relative to `model`) of the parameters that live on one EP rank only: everything under the routed
    experts of an MoE block (adapters on them included), found by type through DDP / PEFT wrappers."""
    prefixes = tuple(f"{name}." for name in expert_modules(model))
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


@torch.no_grad()
def prepare_for_ddp(model: nn.Module) -> nn.Module:
    """Tell DDP to leave expert parameters alone (`finish_gradients` syncs them) and make the expert replicas equal.

    Call again after wrapping the model (e.g. `get_peft_model`) and before `accelerator.prepare`: DDP matches the
    names against the wrapper's, and new expert weights (LoRA on experts) start equal on the D replicas only after
    the broadcast this does from the first replica (DDP's own broadcast does that for the other weights).
    Collective over the expert-data-parallel group.
    """
    model._ddp_params_and_buffers_to_ignore = expert_parameter_names(model)
    groups = expert_parallel_groups(model)
    if groups is not None and groups.edp_size > 1:
        expert = set(model._ddp_params_and_buffers_to_ignore)
        for name, p in model.named_parameters():
            if name in expert:
                # the first replica of this rank's experts is global rank ep_rank (expert-data-parallel groups
                # are strided)
                dist.broadcast(p.data, src=groups.ep_rank, group=groups.edp_group)
    return model
