"""Expert-parallel dispatch: the only place that talks to the network in the forward pass.

Each token travels once to every rank that owns at least one of its experts (not once per expert: with E = 128,
k = 8 and P = 2 that is ~1 copy instead of ~4), together with its routing restricted to that rank. The owner runs
its local experts with the same experts implementation as a single process and returns one row per token, the
weighted sum of its local experts' outputs; the source rank sums the rows of each token over ranks in a fixed
order. Per MoE layer: one all-to-all of counts (the one host sync), then, for each chunk of the tokens,
`all_to_all_single` with uneven splits for the tokens and their routing, and one for the results.

The tokens are split into chunks so that communication overlaps computation: the all-to-alls are asynchronous, so
chunk c+1 travels while chunk c's experts run and chunk c's results travel back while chunk c+1's run; the backward
pass overlaps the same way in reverse.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .experts import _HAS_TRITON, _triton_kernels, run_routed_experts
from .router import RouterOutput


def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`src[index]` (Triton row gather on CUDA)."""
    if src.is_cuda and _HAS_TRITON and len(index):
        offsets = torch.full((1,), len(index), dtype=torch.int32, device=src.device)
        return _triton_kernels().gather_rows(src.contiguous(), index, offsets)
    return src.index_select(0, index)


def _sum_rows(src: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """`out[t] = Σ_p src[row_of[t, p]]` over the entries below `len(src)`, in a fixed order (deterministic)."""
    num_tokens = row_of.shape[0]
    if src.is_cuda and _HAS_TRITON and num_tokens:
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


class _Pending:
    """The asynchronous all-to-alls of one chunk in flight: started by `_StartAllToAll` in the forward pass and by
    `_WaitAllToAll` in the backward pass (whose output buffers it also holds), waited for by the other one."""

    def __init__(self) -> None:
        self.works: list[dist.Work] = []
        self.outputs: tuple[torch.Tensor, ...] = ()

    def wait(self) -> tuple[torch.Tensor, ...]:
        """Make the current stream wait for the all-to-alls (no host sync on GPUs); returns their outputs."""
        for work in self.works:
            work.wait()
        outputs, self.works, self.outputs = self.outputs, [], ()
        return outputs


def _all_to_all_async(
    tensors: tuple[torch.Tensor, ...], output_splits: list[int], input_splits: list[int], group, pending: _Pending
) -> tuple[torch.Tensor, ...]:
    """Start one `all_to_all_single` per tensor (same splits); their output buffers are returned and kept in
    `pending`."""
    outs = []
    for x in tensors:
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        pending.works.append(
            dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group, async_op=True)
        )
        outs.append(out)
    pending.outputs = tuple(outs)
    return pending.outputs


class _StartAllToAll(torch.autograd.Function):
    """Starts the all-to-all of `tensors` with uneven splits and returns their (still arriving) buffers; read them
    only after `_WaitAllToAll`. Its backward waits for the reverse all-to-all that `_WaitAllToAll.backward` began
    and returns its result."""

    @staticmethod
    def forward(ctx, output_splits: list[int], input_splits: list[int], group, pending: _Pending, *tensors):
        ctx.pending = pending
        return _all_to_all_async(tensors, output_splits, input_splits, group, pending)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None, None, *ctx.pending.wait())


class _WaitAllToAll(torch.autograd.Function):
    """Waits for the all-to-all `_StartAllToAll` began. Its backward starts the reverse all-to-all of the gradients
    (splits swapped) without waiting, so the backward of other chunks runs meanwhile. Every tensor always travels
    (zeros for a gradient that is None), so every rank issues the same collectives in the same order."""

    @staticmethod
    def forward(ctx, output_splits: list[int], input_splits: list[int], group, pending: _Pending, *buffers):
        pending.wait()
        ctx.splits, ctx.group, ctx.pending = (output_splits, input_splits), group, pending
        ctx.like = [(b.shape, b.dtype, b.device) for b in buffers]
        return tuple(b.view_as(b) for b in buffers)

    @staticmethod
    def backward(ctx, *grads):
        output_splits, input_splits = ctx.splits
        grads = tuple(
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g
            for g, (shape, dtype, device) in zip(grads, ctx.like)
        )
        _all_to_all_async(grads, input_splits, output_splits, ctx.group, ctx.pending)
        return (None, None, None, None, *grads)


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
        num_chunks: how many chunks the tokens are split into so that all-to-alls overlap the experts' compute
            (1: no overlap). Every rank of the group must use the same number.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int, num_chunks: int = 2) -> None:
        if num_chunks < 1:
            raise ValueError(f"num_chunks={num_chunks} is invalid: expected an integer >= 1.")
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.num_chunks = num_chunks

    def __call__(self, x: torch.Tensor, routing: RouterOutput, experts: nn.Module) -> torch.Tensor:
        ep_size, device = self.ep_size, x.device
        rank_of_slot = torch.div(routing.top_k_index, self.num_local, rounding_mode="floor")  # sentinels: ep_size
        slots = torch.zeros(x.shape[0], ep_size + 1, dtype=torch.int64, device=device)
        slots = slots.scatter_add_(1, rank_of_slot, torch.ones_like(rank_of_slot))[:, :ep_size]
        goes = slots > 0  # [T, P]: token t travels to rank p (once, whatever its number of experts there)

        # Tokens and slots each rank sends to each rank, per chunk, in one exchange: the one host sync.
        size, extra = divmod(x.shape[0], self.num_chunks)
        bounds = [size + (c < extra) for c in range(self.num_chunks)]
        chunks = [slice(sum(bounds[:c]), sum(bounds[: c + 1])) for c in range(self.num_chunks)]
        counts = torch.stack([torch.stack([goes[c].sum(dim=0), slots[c].sum(dim=0)]) for c in chunks])  # [C, 2, P]
        received = counts.new_empty(ep_size * self.num_chunks * 2)
        dist.all_to_all_single(received, counts.permute(2, 0, 1).reshape(-1), group=self.group)  # 2·C to each
        counts = torch.stack([counts, received.view(ep_size, self.num_chunks, 2).permute(1, 2, 0)]).tolist()

        # Start every chunk's dispatch, then run each chunk's experts as it arrives and start its combine.
        dispatches = []
        for c, chunk in enumerate(chunks):
            plan = self._plan(x[chunk], routing.top_k_index[chunk], routing.top_k_weights[chunk], rank_of_slot[chunk],
                              goes[chunk], input_splits=counts[0][c][0])
            pending, output_splits = _Pending(), counts[1][c][0]
            buffers = _StartAllToAll.apply(output_splits, plan.input_splits, self.group, pending, *plan.payload)
            dispatches.append((plan, pending, output_splits, buffers, sum(counts[1][c][1])))
        combines = []
        for plan, pending, output_splits, buffers, num_slots in dispatches:
            tokens, meta = _WaitAllToAll.apply(output_splits, plan.input_splits, self.group, pending, *buffers)
            y = self._experts(tokens, meta, experts, routing.top_k_weights.dtype, num_slots).to(x.dtype)
            combine = _Pending()
            (y,) = _StartAllToAll.apply(plan.input_splits, output_splits, self.group, combine, y)
            combines.append((plan, combine, output_splits, y))
        outs = []
        for plan, combine, output_splits, y in combines:
            (y,) = _WaitAllToAll.apply(plan.input_splits, output_splits, self.group, combine, y)
            outs.append(_SumTokens.apply(y, plan.send_token, plan.row_of))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _plan(
        self,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        rank_of_slot: torch.Tensor,
        goes: torch.Tensor,
        input_splits: list[int],
    ) -> _DispatchPlan:
        """What one chunk sends: its tokens, rank-major and in token order within a rank (`row_of[t, p]` is the row
        of (t, p), or the number of rows), and each row's routing restricted to its destination (local expert ids,
        `num_local` for experts elsewhere, and weights) as one float32 tensor."""
        num_tokens, ep_size, num_local = x.shape[0], self.ep_size, self.num_local
        num_sent = sum(input_splits)
        pairs = goes.t().reshape(-1)
        row = torch.where(pairs, pairs.cumsum(0) - 1, num_sent)
        token_ids = torch.arange(num_tokens, device=x.device).repeat(ep_size)
        send_token = torch.empty(num_sent + 1, dtype=torch.int64, device=x.device).scatter_(0, row, token_ids)
        send_token, row_of = send_token[:num_sent], row.view(ep_size, num_tokens).t()
        dest = torch.arange(ep_size, device=x.device).repeat_interleave(goes.sum(dim=0), output_size=num_sent)[:, None]
        here = rank_of_slot[send_token] == dest
        local_index = torch.where(here, top_k_index[send_token] - dest * num_local, num_local)
        weights = top_k_weights[send_token].masked_fill(~here, 0.0)
        meta = torch.cat([weights.float(), local_index.float()], dim=1)  # ids < 2**24 are exact in float32
        tokens = _GatherTokens.apply(x, send_token, row_of)
        return _DispatchPlan(send_token, row_of, input_splits, (tokens, meta))

    def _experts(
        self, tokens: torch.Tensor, meta: torch.Tensor, experts: nn.Module, dtype: torch.dtype, num_slots: int
    ) -> torch.Tensor:
        """This rank's experts on the tokens it received; a rank that received none returns an empty result that
        stays connected to the graph, so that every rank runs the same backward all-to-alls (the others wait in
        them)."""
        top_k = meta.shape[1] // 2
        if len(tokens):
            return run_routed_experts(experts, tokens, meta[:, top_k:].long(), meta[:, :top_k].to(dtype), num_slots)
        y = tokens * 0
        if meta.requires_grad:
            y = y + meta.sum() * 0
        if torch.is_grad_enabled() and not y.requires_grad and any(p.requires_grad for p in experts.parameters()):
            y.requires_grad_()
        return y


class _DispatchPlan(NamedTuple):
    send_token: torch.Tensor
    row_of: torch.Tensor
    input_splits: list[int]
    payload: tuple[torch.Tensor, torch.Tensor]
