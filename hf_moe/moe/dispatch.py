"""Expert-parallel dispatch: the only place that talks to the network in the forward pass.

Each token travels once to every rank that owns at least one of its experts (not once per expert: with E = 128,
k = 8 and P = 2 that is ~1 copy instead of ~4), together with its routing restricted to that rank. The owner runs
its local experts with the same experts implementation as a single process and returns one row per token, the
weighted sum of its local experts' outputs; the source rank sums the rows of each token over ranks in a fixed
order. Per MoE layer: one all-to-all of counts (the one host sync), then `all_to_all_single` with uneven splits
for the tokens and their routing, and one for the results.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .experts import _gather, _triton_kernels, _use_triton, run_routed_experts
from .router import RouterOutput


def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`src[index]`: the experts' row gather (Triton on CUDA) with every row valid."""
    if not len(index):
        return src.new_empty(0, src.shape[1])
    return _gather(src.contiguous(), index, torch.full((1,), len(index), dtype=torch.int32, device=src.device))


def _sum_rows(src: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """`out[t] = Σ_p src[row_of[t, p]]` over the entries below `len(src)`, in a fixed order (deterministic)."""
    num_tokens = row_of.shape[0]
    if _use_triton(src) and num_tokens:
        offsets = torch.full((1,), len(src), dtype=torch.int32, device=src.device)
        return _triton_kernels().gather_sum(src.contiguous(), row_of.reshape(-1), offsets, num_tokens)
    padded = torch.cat([src, src.new_zeros(1, src.shape[1])])  # row len(src): zeros for the unsent entries
    return padded[row_of].sum(dim=1)


class _GatherTokens(torch.autograd.Function):
    """`x[send_token]`: each token once per destination rank; its backward sums those rows (`_sum_rows`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_token: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(row_of)
        return _gather_rows(x, send_token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (row_of,) = ctx.saved_tensors
        return _sum_rows(grad, row_of), None, None


class _SumTokens(torch.autograd.Function):
    """The adjoint of `_GatherTokens`: every token's rows summed over ranks; its backward copies the gradient."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send_token: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(send_token)
        return _sum_rows(rows, row_of)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (send_token,) = ctx.saved_tensors
        return _gather_rows(grad, send_token), None, None


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
        ep_size, num_local, device = self.ep_size, self.num_local, x.device
        rank_of_slot = torch.div(routing.top_k_index, num_local, rounding_mode="floor")  # sentinel slots: ep_size
        slots = torch.zeros(num_tokens, ep_size + 1, dtype=torch.int64, device=device)
        slots = slots.scatter_add_(1, rank_of_slot, torch.ones_like(rank_of_slot))[:, :ep_size]
        goes = slots > 0  # [T, P]: token t travels to rank p (once, whatever its number of experts there)
        counts = torch.stack([goes.sum(dim=0), slots.sum(dim=0)])  # [2, P]: tokens and slots for each rank
        received = torch.empty(2 * ep_size, dtype=counts.dtype, device=device)
        dist.all_to_all_single(received, counts.t().reshape(-1), group=self.group)  # two numbers to each rank
        (input_splits, _), (output_splits, received_slots) = torch.stack([counts, received.view(-1, 2).t()]).tolist()

        # Send buffer: rank-major, token order within a rank; row_of[t, p] is the row of (t, p), or num_sent.
        num_sent = sum(input_splits)
        pairs = goes.t().reshape(-1)
        row = torch.where(pairs, pairs.cumsum(0) - 1, num_sent)
        token_ids = torch.arange(num_tokens, device=device).repeat(ep_size)
        send_token = torch.empty(num_sent + 1, dtype=torch.int64, device=device).scatter_(0, row, token_ids)
        send_token, row_of = send_token[:num_sent], row.view(ep_size, num_tokens).t()
        dest = torch.arange(ep_size, device=device).repeat_interleave(counts[0], output_size=num_sent)[:, None]

        # Each row's routing restricted to its destination: local expert ids (num_local elsewhere) and weights.
        here = rank_of_slot[send_token] == dest
        local_index = torch.where(here, routing.top_k_index[send_token] - dest * num_local, num_local)
        weights = routing.top_k_weights[send_token].masked_fill(~here, 0.0)
        meta = torch.cat([weights.float(), local_index.float()], dim=1)  # ids < 2**24 are exact in float32

        tokens = _AllToAll.apply(_GatherTokens.apply(x, send_token, row_of), output_splits, input_splits, self.group)
        meta = _AllToAll.apply(meta, output_splits, input_splits, self.group)
        if len(tokens):
            recv_weights = meta[:, :top_k].to(routing.top_k_weights.dtype)
            y = run_routed_experts(experts, tokens, meta[:, top_k:].long(), recv_weights, sum(received_slots))
        else:
            y = self._idle(tokens, meta, experts)
        y = _AllToAll.apply(y.to(x.dtype), input_splits, output_splits, self.group)
        return _SumTokens.apply(y, send_token, row_of)

    @staticmethod
    def _idle(tokens: torch.Tensor, meta: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        """The output of a rank that received no token. Every rank must still run the same backward all-to-alls
        (the others wait in them), so it stays connected to whatever the busy ranks' outputs depend on."""
        y = tokens * 0
        if meta.requires_grad:
            y = y + meta.sum() * 0
        if torch.is_grad_enabled() and not y.requires_grad and any(p.requires_grad for p in experts.parameters()):
            y.requires_grad_()
        return y
