"""Gradients under expert parallelism: expert-gradient sync and a clip norm that is the same on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .sharding import expert_parallel_groups, expert_parameter_names


def _split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The trainable parameters of `model`: (expert, other)."""
    expert_names = set(expert_parameter_names(model))
    expert, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if name in expert_names else other).append(p)
    return expert, other


@torch.no_grad()
def sync_expert_gradients(model: nn.Module) -> None:
    """Sum expert gradients over the expert-data-parallel group and divide by the world size W.

    An expert's gradient on its owner already sums the contributions of the P ranks of its EP group (the
    all-to-all backward brings them home); adding the D replicas and dividing by W gives the gradient of the
    mean loss over all W ranks, which is what DDP (or FSDP) gives the other parameters. Under FSDP
    (`fully_shard_moe`) the experts' reduce-scatter has already averaged over the D replicas, so this divides by P.
    """
    groups = expert_parallel_groups(model)
    if groups is None:
        return
    expert, _ = _split_parameters(model)
    if _fully_sharded(model):
        for p in expert:
            if p.grad is not None:
                _local(p.grad).div_(groups.ep_size)
        return
    _check_experts_outside_ddp(model)
    for p in expert:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if groups.edp_size > 1:
            dist.all_reduce(p.grad, group=groups.edp_group)
        p.grad.div_(groups.world_size)


def _check_experts_outside_ddp(model: nn.Module) -> None:
    """DDP would average each rank's different experts into one (and broadcast rank 0's at wrapping time)."""
    if not isinstance(model, DistributedDataParallel):
        return
    synced = [n for n in expert_parameter_names(model.module) if n not in model.parameters_to_ignore]
    if synced:
        raise RuntimeError(
            f"DDP synchronises {len(synced)} expert parameters (e.g. {synced[0]!r}), which hold different experts on "
            "each rank of an expert-parallel group. Call hf_moe.parallel.prepare_for_ddp(model) on the model you pass "
            "to accelerator.prepare, after any wrapping such as get_peft_model, and prepare it again."
        )


def _fully_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards the model's parameters (`fully_shard_moe`; tensor-parallel DTensors are not counted)."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient (the local shard of an FSDP-sharded one), sharing its storage."""
    return grad.to_local() if isinstance(grad, DTensor) else grad


@torch.no_grad()
def grad_norm(model: nn.Module, norm_type: float = 2.0) -> torch.Tensor:
    """Global gradient norm: √(Σ non-expert² + Σ over all experts of expert²), identical on every rank.

    Under DDP, non-expert gradients are already identical on every rank; each expert is counted once, on its owner.
    Under FSDP (`fully_shard_moe`) every gradient element lives on exactly one rank (non-expert shards over all
    ranks, expert shards over their EP and expert-data-parallel ranks), so the squares are summed over all ranks.
    A per-rank norm would differ between ranks and let the replicas of the non-expert weights drift apart.
    Returned in float32, or float64 when a gradient is float64 (as `torch.nn.utils.clip_grad_norm_`): the clip
    factor derives from it, and a float32 factor would round a float64 model's gradients.
    """
    if norm_type != 2.0:
        raise ValueError(f"norm_type={norm_type} is not supported under expert parallelism; expected 2.0.")
    expert, other = _split_parameters(model)
    sharded = _fully_sharded(model)
    # FSDP's CPU offload keeps gradients on the CPU; the sum goes where the process group communicates
    nccl = sharded and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else next(model.parameters()).device

    dtype = torch.float32
    if any(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters()):
        dtype = torch.float64

    def squares(params: list[nn.Parameter]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for p in params:
            if p.grad is not None:
                grad = _local(p.grad)
                total += grad.to(torch.promote_types(grad.dtype, torch.float32)).pow(2).sum().to(device)
        return total

    if sharded:
        total = squares(expert) + squares(other)
        dist.all_reduce(total)
        return total.sqrt().to(dtype)
    expert_sq = squares(expert)
    groups = expert_parallel_groups(model)
    if groups is not None:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    return (squares(other) + expert_sq).sqrt().to(dtype)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float | None = None) -> torch.Tensor:
    """Returns the global gradient norm (`grad_norm`) and, with `max_norm`, scales every gradient by
    `min(1, max_norm / norm)`, the same factor on every rank (as `torch.nn.utils.clip_grad_norm_` does)."""
    norm = grad_norm(model)
    if max_norm is not None and max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                grad = _local(p.grad)
                grad.mul_(scale.to(grad.device))
    return norm


def finish_gradients(model: nn.Module, max_norm: float | None = None) -> torch.Tensor:
    """Call after `accelerator.backward(loss)` (after the last micro-batch) and before `optimizer.step()`.

    Syncs expert gradients (no-op without expert parallelism), then returns the global gradient norm and, with
    `max_norm`, clips every gradient by the same factor on every rank.
    """
    sync_expert_gradients(model)
    return clip_grad_norm_(model, max_norm)
