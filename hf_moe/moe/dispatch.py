"""Expert-parallel dispatch: the only place that talks to the network in the forward pass.

Tokens go to the rank that owns their expert with one all-to-all of per-expert counts and one `all_to_all_single`
with uneven splits; the owner runs its local experts with the same experts implementation as a single process;
a second all-to-all brings the results back, where the k slots of each token are weighted and summed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .router import RouterOutput


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` with uneven splits; its backward is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), input_splits, output_splits, ctx.group), None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group; the gradient of every rank's copy of the sum flows back to every input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum of `x` over `group` (used for losses over the tokens of every rank)."""
    return _AllReduceSum.apply(x, group)


class AllToAllDispatcher:
    """Routes tokens to the experts of an expert-parallel group and combines the results.

    Args:
        group: the expert-parallel process group (P ranks; rank r owns experts [r·E/P, (r+1)·E/P)).
        num_experts: E, the number of experts over the whole group.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size

    def __call__(self, x: torch.Tensor, routing: RouterOutput, experts: nn.Module) -> torch.Tensor:
        num_tokens, top_k = routing.top_k_index.shape
        flat_expert = routing.top_k_index.reshape(-1)
        order = flat_expert.argsort(stable=True)  # sentinel slots (index == num_experts) sort last and stay home
        counts = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=x.device)
        counts = counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))[: self.num_experts]

        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        send, received = counts.view(self.ep_size, self.num_local), received.view(self.ep_size, self.num_local)
        input_splits, output_splits = torch.stack([send.sum(dim=1), received.sum(dim=1)]).tolist()  # the one sync
        kept = order[: sum(input_splits)]

        tokens = _AllToAll.apply(x[kept // top_k], output_splits, input_splits, self.group)
        local_ids = torch.arange(self.num_local, device=x.device).repeat(self.ep_size)
        local_ids = local_ids.repeat_interleave(received.reshape(-1), output_size=sum(output_splits))
        if len(tokens):
            y = experts(tokens, local_ids[:, None], torch.ones(len(tokens), 1, dtype=x.dtype, device=x.device))
        else:  # not every experts implementation accepts an empty batch
            y = tokens * 0
        if torch.is_grad_enabled() and not y.requires_grad and _needs_grad(x, experts):
            # No token reached this rank and the experts returned a constant. Every rank must still run both
            # backward all-to-alls (the others wait in them), so keep this rank's graph connected.
            y = y + tokens.sum() * 0 if tokens.requires_grad else y.requires_grad_()
        y = _AllToAll.apply(y, input_splits, output_splits, self.group)

        weights = routing.top_k_weights.reshape(-1)[kept, None].to(y.dtype)
        slots = y.new_zeros((num_tokens * top_k, y.shape[-1])).index_copy(0, kept, y * weights)
        return slots.view(num_tokens, top_k, x.shape[-1]).sum(dim=1).to(x.dtype)


def _needs_grad(x: torch.Tensor, experts: nn.Module) -> bool:
    """Whether the backward pass will reach this layer's all-to-alls; the same answer on every rank."""
    return x.requires_grad or any(p.requires_grad for p in experts.parameters())
