"""The (token, slot) pairs ordered by expert without torch's sort: one Triton launch for few pairs (decode), a
counting sort in two launches for many (prefill, training).

torch's stable sort of the T·k expert ids is a dozen GPU launches (radix-sort passes and memsets) and, with the
searchsorted and scatter around it, eight host ops per MoE layer. Both kernels here compute the same outputs from
counts: the row of pair i is the number of pairs with a smaller expert id plus the number of earlier pairs with the
same id (a stable order), and the end row of expert e is the number of pairs with an id ≤ e.

- `sort_by_expert` (one launch): each program counts over all pairs in `[BLOCK, BLOCK_J]` comparison tiles, for one
  block of pairs (their rows) and one block of experts (their end rows): O(n·(n + E)) work, for small n and E.
- `counting_sort_by_expert` (two launches): the first counts each block of pairs per expert; the second reads
  those counts, which give the first row of every block's pairs of each expert (the pairs of smaller experts, then
  those of the same expert in earlier blocks), sorts its block by (expert, index) in registers and writes each
  pair at that first row plus its rank among its block's pairs of the same expert. Every program reads the whole
  count table (blocks × experts), so the block size grows with n to keep the table small.

The rule choosing between them and torch's sort is `hf_moe.moe.experts.grouped.sort_by_expert`'s. The launches read
shapes only (grids and output sizes come from n, E and `num_rows`), never a value on the device, so nothing waits
for the GPU and they can be captured in a CUDA graph.
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


# Counting sort: the count table (blocks × bins, int32) that every program of the second launch reads stays within
# this many counters: the block of pairs per program grows with n (from `_MIN_BLOCK` to `_MAX_BLOCK` pairs, sorted in
# registers) rather than the table.
_TABLE, _MIN_BLOCK, _MAX_BLOCK = 1 << 15, 256, 4096


@triton.jit
def _bucket(index_ptr, pairs, num_pairs, num_experts):
    """Each pair's expert id, the ids outside `[0, E)` (sentinels) as E and the pairs past the end as E + 1."""
    valid = pairs < num_pairs
    expert = tl.load(index_ptr + pairs, mask=valid, other=0)
    expert = tl.where((expert >= 0) & (expert < num_experts), expert, num_experts)
    return tl.where(valid, expert, num_experts + 1).to(tl.int32)


@triton.jit
def _count_kernel(index_ptr, counts_ptr, num_pairs, num_experts, BLOCK: tl.constexpr, BINS: tl.constexpr):
    block = tl.program_id(0)
    bucket = _bucket(index_ptr, block * BLOCK + tl.arange(0, BLOCK), num_pairs, num_experts)
    counts = tl.histogram(bucket, BINS, mask=bucket <= num_experts)
    tl.store(counts_ptr + block * BINS + tl.arange(0, BINS), counts)


@triton.jit
def _place_kernel(
    index_ptr, counts_ptr, token_ptr, order_ptr, position_ptr, offsets_ptr, num_pairs, num_experts, num_blocks,
    num_rows, top_k, BLOCK: tl.constexpr, BINS: tl.constexpr, ROWS: tl.constexpr,
):
    block = tl.program_id(0)
    bins = tl.arange(0, BINS)
    total = tl.zeros([BINS], dtype=tl.int32)  # pairs of each expert
    before = tl.zeros([BINS], dtype=tl.int32)  # pairs of each expert in earlier blocks
    own = tl.zeros([BINS], dtype=tl.int32)  # pairs of each expert in this block
    for start in range(0, num_blocks, ROWS):
        rows = start + tl.arange(0, ROWS)
        counts = tl.load(counts_ptr + rows[:, None] * BINS + bins[None, :], mask=rows[:, None] < num_blocks, other=0)
        total += tl.sum(counts, axis=0)
        before += tl.sum(tl.where(rows[:, None] < block, counts, 0), axis=0)
        own += tl.sum(tl.where(rows[:, None] == block, counts, 0), axis=0)
    end = tl.cumsum(total, axis=0)  # end row of each expert
    tl.store(offsets_ptr + bins, end, mask=(bins < num_experts) & (block == 0))
    # first row of this block's pairs of each expert, less the place where they start in the block's sorted pairs
    shift = end - total + before - (tl.cumsum(own, axis=0) - own)
    local = tl.arange(0, BLOCK)
    bucket = _bucket(index_ptr, block * BLOCK + local, num_pairs, num_experts)
    key = tl.sort(bucket * BLOCK + local)  # by (expert, index): distinct keys, so a stable order
    bucket, pair = key // BLOCK, block * BLOCK + key % BLOCK
    row = local + tl.gather(shift, tl.minimum(bucket, BINS - 1), axis=0)
    real = bucket <= num_experts
    # rows past num_rows are cut off; their pairs point at the last kept row
    tl.store(position_ptr + pair, tl.minimum(row, num_rows - 1).to(tl.int64), mask=real)
    kept = real & (row < num_rows)
    tl.store(order_ptr + row, pair.to(tl.int64), mask=kept)
    tl.store(token_ptr + row, (pair // top_k).to(tl.int64), mask=kept)


def _num_rows(top_k_index: torch.Tensor, num_slots: int | None) -> int:
    num_pairs = top_k_index.numel()
    return num_pairs if num_slots is None else min(num_slots + 1, num_pairs)


def _outputs(
    top_k_index: torch.Tensor, num_experts: int, num_slots: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flat ids (contiguous) and the empty outputs `(token, order, position, offsets)`."""
    flat = top_k_index.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    num_rows, new = _num_rows(top_k_index, num_slots), flat.new_empty
    return (flat, new(num_rows, dtype=torch.int64), new(num_rows, dtype=torch.int64),
            new(flat.numel(), dtype=torch.int64), new(num_experts, dtype=torch.int32))


def _sort_by_expert(
    top_k_index: torch.Tensor, num_experts: int, num_slots: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(token [S], order [S], position [T·k], offsets [E])` of `top_k_index [T, k]` (any integer dtype), as
    `hf_moe.moe.experts.grouped.sort_by_expert` defines them (int64, int64, int64, int32), in one launch."""
    flat, token, order, position, offsets = _outputs(top_k_index, num_experts, num_slots)
    num_pairs = flat.numel()
    grid = (triton.cdiv(max(num_pairs, num_experts, 1), _BLOCK),)
    _sort_by_expert_kernel[grid](
        flat, token, order, position, offsets, num_pairs, num_experts, token.numel(), top_k_index.shape[-1],
        BLOCK=_BLOCK, BLOCK_J=_BLOCK_J,
    )
    return token, order, position, offsets


def _counting_sort_by_expert(
    top_k_index: torch.Tensor, num_experts: int, num_slots: int | None = None, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same outputs as `_sort_by_expert` in two launches (a counting sort), for many pairs. `block_size`: the
    pairs per program (a power of two ≥ 16; None: from n and E)."""
    flat, token, order, position, offsets = _outputs(top_k_index, num_experts, num_slots)
    num_pairs, bins = flat.numel(), triton.next_power_of_2(num_experts + 1)
    if block_size is None:
        per_table = max(1, _TABLE // bins)
        block_size = min(max(triton.next_power_of_2(triton.cdiv(num_pairs, per_table)), _MIN_BLOCK), _MAX_BLOCK)
    elif block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"counting_sort_by_expert: block_size must be a power of two >= 16, got {block_size}")
    num_blocks = max(triton.cdiv(num_pairs, block_size), 1)
    counts = flat.new_empty((num_blocks, bins), dtype=torch.int32)
    num_warps = 4 if block_size <= 1024 else 8
    _count_kernel[(num_blocks,)](flat, counts, num_pairs, num_experts, BLOCK=block_size, BINS=bins,
                                 num_warps=num_warps)
    rows = max(1, min(triton.next_power_of_2(num_blocks), 4096 // bins))
    _place_kernel[(num_blocks,)](
        flat, counts, token, order, position, offsets, num_pairs, num_experts, num_blocks, token.numel(),
        top_k_index.shape[-1], BLOCK=block_size, BINS=bins, ROWS=rows, num_warps=num_warps,
    )
    return token, order, position, offsets


def _sort_by_expert_fake(
    top_k_index: torch.Tensor, num_experts: int, num_slots: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows = _num_rows(top_k_index, num_slots)
    new = top_k_index.new_empty
    return (new(num_rows, dtype=torch.int64), new(num_rows, dtype=torch.int64),
            new(top_k_index.numel(), dtype=torch.int64), new(num_experts, dtype=torch.int32))


def _counting_sort_by_expert_fake(
    top_k_index: torch.Tensor, num_experts: int, num_slots: int | None = None, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sort_by_expert_fake(top_k_index, num_experts, num_slots)


sort_by_expert = register_kernel_op("sort_by_expert", _sort_by_expert, _sort_by_expert_fake)
counting_sort_by_expert = register_kernel_op(
    "counting_sort_by_expert", _counting_sort_by_expert, _counting_sort_by_expert_fake
)
