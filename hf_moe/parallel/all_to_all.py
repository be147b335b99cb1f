"""Expert-parallel dispatch: tokens travel to the ranks that own their experts and back (all-to-all).

Each token travels once to every rank that owns at least one of its experts (not once per expert: with E = 128,
k = 8 and P = 2 that is ~1 copy instead of ~4), together with its routing restricted to that rank. The owner runs
its local experts with the same experts implementation as a single process and returns one row per token, the
weighted sum of its local experts' outputs; the source rank sums the rows of each token over ranks in a fixed
order. Per MoE layer: one all-to-all of counts (the one host sync, taken after the send buffer is already
queued), then `all_to_all_single` with uneven splits for the tokens with their routing packed into the same rows,
and one for the results.

Padded mode (`padded=True`) sends every token to every rank of the group, with equal splits, so no counts are
exchanged and the forward pass has no host sync at all; rows for a rank that owns none of the token's experts carry
no routing and come back as zeros. It suits many experts per token (E 128, k 8 and P ≤ 4: 1.99 of 2 and 3.64 of 4
rows per token are needed anyway), needs the same number of tokens on every rank, and sizes the local experts'
buffers for P·T·k slots instead of the slots received.

With `overlap_weight_grads`, the two token all-to-alls of backward run while the experts' weight gradients compute
(`hf_moe.parallel.weight_grad_queue`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..moe.experts import run_experts
from ..moe.ops import gather_rows, gather_sum
from ..moe.types import RouterOutput
from .collectives import all_to_all
from .weight_grad_queue import WEIGHT_GRADS


def _routing_dtype(weights: torch.Tensor) -> torch.dtype:
    """The dtype routing travels in: float32 (exact for half-precision weights and for expert ids below 2**24),
    float64 for a float64 model, whose weights float32 would round."""
    return torch.float64 if weights.dtype == torch.float64 else torch.float32


def _reinterpret(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bytes of the rows of 2-D `t` read as `dtype` (a copy when `t` is not contiguous)."""
    width = t.shape[1] * t.element_size() // dtype.itemsize
    return t.contiguous().view(dtype) if t.numel() else t.new_empty(t.shape[0], width, dtype=dtype)


class _PackRows(torch.autograd.Function):
    """The send buffer: row r holds token `x[send_token[r]]` (rows from `num_sent`, a device tensor, on stay
    unwritten) followed by the bytes of its routing `meta[r]` (in [`_routing_dtype`]), so one all-to-all carries
    both. Its backward sums each token's rows (`gather_sum`) and hands back the routing's gradient."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, meta: torch.Tensor, send_token: torch.Tensor, num_sent: torch.Tensor,
        row_of: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(row_of)
        ctx.hidden = hidden = x.shape[1]
        ctx.meta_dtype = meta.dtype
        packed = x.new_empty(len(send_token), hidden + meta.shape[1] * meta.element_size() // x.element_size())
        packed[:, hidden:] = _reinterpret(meta, x.dtype)
        if len(send_token):
            gather_rows(x.contiguous(), send_token, num_sent, out=packed[:, :hidden])
        return packed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (row_of,) = ctx.saved_tensors
        grad_meta = _reinterpret(grad[:, ctx.hidden :], ctx.meta_dtype)
        return gather_sum(grad[:, : ctx.hidden], row_of), grad_meta, None, None, None


class _UnpackRows(torch.autograd.Function):
    """Received rows → their tokens `[n, H]` (a view) and their routing in `meta_dtype`; backward packs both
    gradients again."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, hidden: int, meta_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.shape, ctx.hidden = rows.shape, hidden
        return rows[:, :hidden], _reinterpret(rows[:, hidden:], meta_dtype)

    @staticmethod
    def backward(ctx, grad_tokens: torch.Tensor, grad_meta: torch.Tensor):
        grad = grad_tokens.new_empty(ctx.shape)
        grad[:, : ctx.hidden] = grad_tokens
        grad[:, ctx.hidden :] = _reinterpret(grad_meta, grad.dtype)
        return grad, None, None


class _SumTokens(torch.autograd.Function):
    """The adjoint of `_GatherTokens`: every token's rows summed over ranks; its backward copies the gradient."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send_token: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(send_token)
        return gather_sum(rows, row_of)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (send_token,) = ctx.saved_tensors
        if not len(send_token):
            return grad.new_empty(0, grad.shape[1]), None, None
        num_sent = torch.full((1,), len(send_token), dtype=torch.int32, device=grad.device)
        return gather_rows(grad.contiguous(), send_token, num_sent), None, None


def _plan(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, ep_size: int, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What this rank sends where, from its own routing alone (no communication, no host sync).

    Returns `counts [2, P]` (tokens and slots bound for each rank), `send_token [R]` (the token of each send row:
    rank-major, token order within a rank, R = T·min(P, k) rows, the most a batch can need; rows past
    `counts[0].sum()` are padding), `row_of [T, P]` (the send row of token t for rank p, R where t does not go to
    p) and `meta [R, 2k]` (in [`_routing_dtype`]: each row's routing restricted to its destination, the weights then
    the local expert ids, `num_local` and weight 0 for experts elsewhere).
    """
    num_tokens, top_k = top_k_index.shape
    device = top_k_index.device
    rank_of_slot = torch.div(top_k_index, num_local, rounding_mode="floor")  # sentinel slots: ep_size
    slots = torch.zeros(num_tokens, ep_size + 1, dtype=torch.int64, device=device)
    slots = slots.scatter_add_(1, rank_of_slot, torch.ones_like(rank_of_slot))[:, :ep_size]
    goes = slots > 0  # [T, P]: token t travels to rank p (once, whatever its number of experts there)
    counts = torch.stack([goes.sum(dim=0), slots.sum(dim=0)])
    max_rows = num_tokens * min(ep_size, top_k)
    pairs = goes.t().reshape(-1)
    row = torch.where(pairs, pairs.cumsum(0) - 1, max_rows)
    pair_ids = torch.arange(ep_size * num_tokens, device=device)
    sent_pair = torch.zeros(max_rows + 1, dtype=torch.int64, device=device).scatter_(0, row, pair_ids)[:-1]
    send_token, dest = sent_pair % num_tokens, torch.div(sent_pair, num_tokens, rounding_mode="floor")[:, None]
    here = rank_of_slot[send_token] == dest
    local_index = torch.where(here, top_k_index[send_token] - dest * num_local, num_local)
    weights = top_k_weights[send_token].masked_fill(~here, 0.0)
    dtype = _routing_dtype(top_k_weights)
    meta = torch.cat([weights.to(dtype), local_index.to(dtype)], dim=1)
    return counts, send_token, row.view(ep_size, num_tokens).t(), meta


def _padded_plan(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, ep_size: int, num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[`_plan`] for padded mode: every token to every rank, rank-major (row p·T + t is token t for rank p).

    Returns `send_token [P·T]`, `row_of [T, P]` and `meta [P·T, 2k]`, as `_plan` does.
    """
    num_tokens = top_k_index.shape[0]
    device = top_k_index.device
    dest = torch.arange(ep_size, device=device)[:, None, None]
    here = torch.div(top_k_index, num_local, rounding_mode="floor")[None] == dest  # [P, T, k]
    local_index = torch.where(here, top_k_index[None] - dest * num_local, num_local)
    dtype = _routing_dtype(top_k_weights)
    weights = top_k_weights[None].to(dtype).masked_fill(~here, 0.0)
    meta = torch.cat([weights, local_index.to(dtype)], dim=2).view(ep_size * num_tokens, 2 * top_k_index.shape[1])
    rows = torch.arange(ep_size * num_tokens, device=device)
    return rows % num_tokens, rows.view(ep_size, num_tokens).t(), meta


class AllToAllDispatcher:
    """Routes tokens to the experts of an expert-parallel group and combines the results.

    Args:
        group: the expert-parallel process group (P ranks; rank r owns experts [r·E/P, (r+1)·E/P)).
        num_experts: E, the number of experts over the whole group.
        overlap_weight_grads: in backward, compute the local experts' weight gradients while the token
            all-to-alls are in flight (see `hf_moe.parallel.weight_grad_queue`). Off by default: it pays only where
            the all-to-alls are slow next to the GEMMs, not over NVLink (docs/decisions/expert-parallel-dispatch.md).
        padded: send every token to every rank with equal splits: no host sync in the forward pass, at the cost
            of expert buffers for P·T·k slots (see the module's docstring). Every rank of the group must then pass
            the same number of tokens (fixed batch and sequence length) on every call; the first call checks that
            (one host sync) and raises on every rank if not, later calls do not (a batch padded to its own longest
            sequence, or a ragged last batch, would then make the all-to-all hang or fail).
        sharded_experts: the experts' weights are FSDP-sharded over the expert-data-parallel group
            (`hf_moe.parallel.fully_shard_moe`), whose all-gathers and reduce-scatters are collectives every rank of
            the group must join: every rank then runs the experts module on every call, on the tokens it received
            plus one zero row routed to its first expert with weight 0, so the module's forward and backward run
            even where no token arrived, its output (exactly the tokens' outputs) stays in the autograd graph, and
            every expert weight gets a gradient (zeros for experts no token reached), as FSDP's reduce-scatter
            needs the same tensors from every rank.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_experts: int,
        overlap_weight_grads: bool = False,
        padded: bool = False,
        sharded_experts: bool = False,
    ) -> None:
        if sharded_experts and overlap_weight_grads:
            raise ValueError("overlap_weight_grads=True cannot be combined with FSDP-sharded experts: it accumulates "
                             "weight gradients outside autograd, after FSDP has reduce-scattered them.")
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.weight_grads = WEIGHT_GRADS if overlap_weight_grads else None
        self.padded = padded
        self.sharded_experts = sharded_experts
        self._tokens_checked = False

    @property
    def capturable(self) -> bool:
        """Whether CUDA graphs can capture this dispatcher: only padded dispatch without the backward overlap never
        waits for the GPU (the default dispatch reads the all-to-all counts on the host once per layer)."""
        return self.padded and self.weight_grads is None

    # torch.compile: the dispatcher is the one graph break of an expert-parallel MoE block. The router, the shared
    # experts and the rest of the model compile around it; the dispatch runs eagerly (its local experts are hf-moe's
    # kernels either way): its splits come from the host (default dispatch) and its collectives, its backward
    # overlap and its checks are host-side Python.
    @torch.compiler.disable
    def __call__(self, x: torch.Tensor, routing: RouterOutput, experts: nn.Module) -> torch.Tensor:
        num_tokens, top_k = routing.top_k_index.shape
        if self.padded:
            if not self._tokens_checked:
                self._check_equal_tokens(num_tokens, x.device)
            send_token, row_of, meta = _padded_plan(routing.top_k_index, routing.top_k_weights, self.ep_size,
                                                    self.num_local)
            num_sent = torch.full((1,), len(send_token), dtype=torch.int32, device=x.device)
            send = _PackRows.apply(x, meta, send_token, num_sent, row_of)
            input_splits = output_splits = [num_tokens] * self.ep_size
            num_slots = None
        else:
            counts, send_token, row_of, meta = _plan(routing.top_k_index, routing.top_k_weights, self.ep_size,
                                                     self.num_local)
            received = torch.empty(2 * self.ep_size, dtype=counts.dtype, device=x.device)
            dist.all_to_all_single(received, counts.t().reshape(-1), group=self.group)  # two numbers to each rank
            # The send buffer is queued before the host sync below, so the GPU has work while the host waits.
            send = _PackRows.apply(x, meta, send_token, counts[0].sum(dim=0, keepdim=True).int(), row_of)
            (input_splits, _), (output_splits, received_slots) = (
                torch.stack([counts, received.view(-1, 2).t()]).tolist()
            )
            num_slots = sum(received_slots)
        received_rows = all_to_all(send, output_splits, input_splits, self.group, self.weight_grads)
        tokens, meta = _UnpackRows.apply(received_rows, x.shape[1], meta.dtype)
        if self.sharded_experts:
            y = self._run_with_zero_row(experts, tokens, meta, top_k, routing.top_k_weights.dtype, num_slots)
        elif len(tokens):
            recv_weights = meta[:, :top_k].to(routing.top_k_weights.dtype)
            y = run_experts(experts, tokens, meta[:, top_k:].long(), recv_weights, num_slots, self.weight_grads)
        else:
            y = tokens * 0
        y = self._stay_in_backward(y, tokens, meta, experts)
        y = all_to_all(y.to(x.dtype), input_splits, output_splits, self.group, self.weight_grads)
        return _SumTokens.apply(y, send_token[: sum(input_splits)], row_of)

    def _check_equal_tokens(self, num_tokens: int, device: torch.device) -> None:
        """Padded mode's equal splits need the same number of tokens on every rank: raise on all of them if not."""
        gathered = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(self.ep_size)]
        dist.all_gather(gathered, torch.tensor([num_tokens], device=device), group=self.group)
        tokens = torch.cat(gathered).tolist()
        if len(set(tokens)) > 1:
            raise ValueError(
                f"padded expert-parallel dispatch needs the same number of tokens (batch × sequence) on every rank "
                f"of the expert-parallel group; got {tokens}. Give every rank batches of one shape (e.g. a fixed "
                "max_length) or use the default dispatch (padded_dispatch=False)."
            )
        self._tokens_checked = True

    def _run_with_zero_row(
        self, experts: nn.Module, tokens: torch.Tensor, meta: torch.Tensor, top_k: int, dtype: torch.dtype,
        num_slots: int | None,
    ) -> torch.Tensor:
        """The experts' outputs for `tokens`, computed with one extra zero row routed to local expert 0 with weight 0
        (the other slots empty): it adds exactly 0 to that expert's gradient and is dropped from the output, but
        makes every rank of the expert-data-parallel group run the (FSDP-sharded) experts module in forward and
        backward, as its collectives require."""
        zero_meta = meta.new_zeros(1, 2 * top_k)
        zero_meta[0, top_k + 1 :] = self.num_local
        rows = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])])
        meta = torch.cat([meta, zero_meta])
        index, weights = meta[:, top_k:].long(), meta[:, :top_k].to(dtype)
        return run_experts(experts, rows, index, weights, None if num_slots is None else num_slots + 1)[:-1]

    @staticmethod
    def _stay_in_backward(
        y: torch.Tensor, tokens: torch.Tensor, meta: torch.Tensor, experts: nn.Module
    ) -> torch.Tensor:
        """`y`, connected to autograd whenever training. Every rank must run the same backward all-to-alls (the
        others wait in them), also a rank whose experts received no token or no slot of theirs (padded mode), so
        its output stays connected to whatever the busy ranks' outputs depend on."""
        if y.requires_grad or not torch.is_grad_enabled():
            return y
        for source in (tokens, meta):
            if source.requires_grad:
                y = y + source.sum() * 0
        if not y.requires_grad and any(p.requires_grad for p in experts.parameters()):
            y.requires_grad_()
        return y
