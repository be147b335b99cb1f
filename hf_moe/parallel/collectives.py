"""Differentiable collectives: the all-to-all that carries tokens between ranks and the sum of a statistic over ranks.

Each is an autograd function whose backward is the adjoint collective, so expert-parallel layers and global losses
train exactly as one process on the concatenated batch would. Every call is bounded by its process group's timeout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .weight_grad_queue import WeightGradQueue


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits of the first `sum(input_splits)` rows of `x` (rows past them are
    not sent, and get a zero gradient); its backward is the all-to-all with the splits swapped.

    With a [`WeightGradQueue`], backward starts its all-to-all asynchronously and runs the oldest deferred weight
    gradient while the bytes travel.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group,
        weight_grads: WeightGradQueue | None = None,
    ) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.rows, ctx.weight_grads = (output_splits, input_splits), group, len(x), weight_grads
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x[: sum(input_splits)].contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad_x = grad.new_empty((ctx.rows, *grad.shape[1:]))
        sent = sum(input_splits)
        grad_x[sent:].zero_()
        work = dist.all_to_all_single(
            grad_x[:sent], grad.contiguous(), input_splits, output_splits, group=ctx.group, async_op=True
        )
        if ctx.weight_grads is not None:
            ctx.weight_grads.run_oldest()
        work.wait()
        return grad_x, None, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group; the gradient of every rank's copy of the sum flows back to every input. A
    functional collective (a new tensor, no in-place write): torch 2.11 compiles an in-place `dist.all_reduce` in
    a backward without its sum (docs/decisions/compile.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum of `x` over `group` (used for losses over the tokens of every rank)."""
    return _AllReduceSum.apply(x, group)


def all_to_all(
    x: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup,
    weight_grads: WeightGradQueue | None = None,
) -> torch.Tensor:
    """Differentiable `all_to_all_single` of the first `sum(input_splits)` rows of `x` with uneven splits (see
    [`_AllToAll`]); with `weight_grads`, its backward runs deferred weight gradients while the bytes travel."""
    return _AllToAll.apply(x, output_splits, input_splits, group, weight_grads)


def gather_experts(tensor: torch.Tensor, group: dist.ProcessGroup, dim: int = 0) -> torch.Tensor:
    """The experts of every rank of an expert-parallel `group`, concatenated along `dim` in rank order (rank r holds
    experts [r·E/P, (r+1)·E/P)). Collective over `group`."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
