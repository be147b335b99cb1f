"""The (token, slot) pairs ordered by expert in one Triton launch, for few pairs (decode).

At a few tokens per step, `torch.sort` of the T·k expert ids is a dozen GPU launches (radix-sort passes and
memsets) and, with the searchsorted and scatter around it, about seven host ops per MoE layer, for a GPU that has
a few dozen numbers to order. Here the order comes from counting: the rank of pair i is the number of pairs with a
smaller expert id plus the number of earlier pairs with the same id (a stable order), and the end row of expert e
is the number of pairs with an id ≤ e. Each program counts over all pairs in `[BLOCK, BLOCK_J]` comparison tiles,
for one block of pairs (their ranks) and one block of experts (their end rows), so the work is O(n·(n + E)): the
caller uses it for small n and E only (`hf_moe.moe.experts.grouped.sort_by_expert`).

The launch reads shapes only (the grid and the output sizes come from n, E and `num_rows`), never a value on the
device, so nothing waits for the GPU and the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .library import register_kernel_op

# Pairs (ranks) and experts (end rows) per program, and the width of the comparison tile: [128, 32] int32 tiles
# are 32 registers per thread at 4 warps.
_BLOCK, _BLOCK_J = 128, 32


@triton.jit
def _sort_by_expert_kernel(
    index_ptr, token_ptr, order_ptr, position_ptr, offsets_ptr, num_pairs, num_experts, num_rows, top_k,
    BLOCK: tl.constexpr, BLOCK_J: tl.constexpr,
):
    block = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pair_ok = block < num_pairs
    expert = tl.load(index_ptr + block, mask=pair_ok, other=0).to(tl.int32)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    end_row = tl.zeros([BLOCK], dtype=tl.int32)  # of the experts `block`
    for start in range(0, num_pairs, BLOCK_J):
        others = start + tl.arange(0, BLOCK_J)
        other_ok = others < num_pairs
        other = tl.load(index_ptr + others, mask=other_ok, other=0).to(tl.int32)
        before = (other[None, :] < expert[:, None]) | (
            (other[None, :] == expert[:, None]) & (others[None, :] < block[:, None])
        )
        rank += tl.sum((before & other_ok[None, :]).to(tl.int32), axis=1)
        end_row += tl.sum(((other[None, :] <= block[:, None]) & other_ok[None, :]).to(tl.int32), axis=1)
    # rows past num_rows are cut off; their pairs point at the last kept row
    tl.store(position_ptr + block, tl.minimum(rank, num_rows - 1).to(tl.int64), mask=pair_ok)
    kept = pair_ok & (rank < num_rows)
    tl.store(order_ptr + rank, block.to(tl.int64), mask=kept)
    tl.store(token_ptr + rank, (block // top_k).to(tl.int64), mask=kept)
    tl.store(offsets_ptr + block, end_row, mask=block < num_experts)


def _num_rows(top_k_index: torch.Tensor, num_slots: int | None) -> int:
    num_pairs = top_k_index.numel()
    return num_pairs if num_slots is None else min(num_slots + 1, num_pairs)


def _sort_by_expert(
    top_k_index: torch.Tensor, num_experts: int, num_slots: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(token [S], order [S], position [T·k], offsets [E])` of `top_k_index [T, k]` (any integer dtype), as
    `hf_moe.moe.experts.grouped.sort_by_expert` defines them (int64, int64, int64, int32)."""
    flat = top_k_index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_pairs, num_rows = flat.numel(), _num_rows(top_k_index, num_slots)
    token = flat.new_empty(num_rows, dtype=torch.int64)
    order = flat.new_empty(num_rows, dtype=torch.int64)
    position = flat.new_empty(num_pairs, dtype=torch.int64)
    offsets = flat.new_empty(num_experts, dtype=torch.int32)
    grid = (triton.cdiv(max(num_pairs, num_experts, 1), _BLOCK),)
    _sort_by_expert_kernel[grid](
        flat, token, order, position, offsets, num_pairs, num_experts, num_rows, top_k_index.shape[-1],
        BLOCK=_BLOCK, BLOCK_J=_BLOCK_J,
    )
    return token, order, position, offsets


def _sort_by_expert_fake(
    top_k_index: torch.Tensor, num_experts: int, num_slots: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows = _num_rows(top_k_index, num_slots)
    new = top_k_index.new_empty
    return (new(num_rows, dtype=torch.int64), new(num_rows, dtype=torch.int64),
            new(top_k_index.numel(), dtype=torch.int64), new(num_experts, dtype=torch.int32))


sort_by_expert = register_kernel_op("sort_by_expert", _sort_by_expert, _sort_by_expert_fake)
