"""Product-key routing's selection as one Triton kernel: each half's top-k and the merge, per (token, head).

One program per row (token, head) selects by ranks, never by repeated maxima:

1. Halves. A key's rank is the number of keys of its half that beat it (a larger log-probability, or an equal one
   at a lower index), counted over `[BLOCK_I, BLOCK_J]` tiles of the half (re-read from global memory, where it
   stays in cache). The keys of rank < c = min(k, N) are stored at position
   rank of a per-row scratch buffer, so the buffer holds each half's c best, best first.
2. Merge. With both halves sorted, the pair of ranks (a, b) has the (a+1)(b+1) − 1 pairs (a' ≤ a, b' ≤ b) ranked
   above it, so it can be among the k best only if (a+1)(b+1) ≤ k: about k·ln k candidates instead of k². They
   come from a small device table of rank pairs ([`candidate_pairs`]); each candidate's rank among the candidates
   (sum desc, expert `i·N + j` asc) is counted the same way and the candidates of rank < k are stored at output
   position rank.

The sums are formed in float64, where the sum of two float32 log-probabilities is exact (whenever neither is more
than 2²⁸ times the other in magnitude, or one is 0): the pruning in step 2 is exact only when every pair ranks
strictly below the pairs that dominate it, which exact sums with ties to the lower expert guarantee and rounded
float32 sums do not (two different sums can round to one, and the tie rule may then put the dominated pair
first). The torch path of `hf_moe.moe.router.product_key` ranks by the same float64 sums, so both choose the same
experts. NaN log-probabilities rank as −∞, so every output slot is written with an index in range. The selection is
not differentiable; the caller gathers the chosen scores from the log-probabilities with torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CANDIDATES = 64
"""Largest `min(k, N)` the kernel serves; larger selections run the torch path."""

_PAIRS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def candidate_pairs(k: int, candidates: int, device: torch.device) -> torch.Tensor:
    """`[2, P]` int32: the rank pairs (a, b), a and b < `candidates`, with (a+1)(b+1) ≤ k, ordered by a then b.

    Built once per (k, candidates, device) with device ops whose sizes are known on the host (a host-to-device copy
    of a host table would synchronise)."""
    key = (k, candidates, torch.device(device))
    pairs = _PAIRS.get(key)
    if pairs is None:
        rows = torch.arange(candidates, device=device)
        widths = (k // (rows + 1)).clamp(max=candidates)
        num_pairs = sum(min(candidates, k // (a + 1)) for a in range(candidates))
        first = torch.repeat_interleave(rows, widths, output_size=num_pairs)
        second = torch.arange(num_pairs, device=device) - (widths.cumsum(0) - widths).index_select(0, first)
        pairs = torch.stack([first, second]).to(torch.int32)
        if not (pairs.is_cuda and torch.cuda.is_current_stream_capturing()):  # in a capture only replays fill it
            _PAIRS[key] = pairs
    return pairs


@triton.jit
def _load_half(row_ptr, cols, num_keys):
    """Log-probabilities at `cols`; −∞ past the half's end (at an index above every key's) and for NaN."""
    values = tl.load(row_ptr + cols, mask=cols < num_keys, other=float("-inf"))
    return tl.where(values == values, values, float("-inf"))


@triton.jit
def _rank_half(row_ptr, value_ptr, index_ptr, num_keys,
               CANDIDATES: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Store the half's CANDIDATES best keys (value float32, index int32) at position rank, best first.

    A key is beaten by the keys of larger value and by those of equal value at a lower index, so the chunks wholly
    before a key's own `BLOCK_I` chunk count `≥`, those wholly after count `>` (one comparison per pair), and only
    its own chunk compares indices too (`BLOCK_I` is a multiple of `BLOCK_J`)."""
    for start in range(0, num_keys, BLOCK_I):
        cols = start + tl.arange(0, BLOCK_I)
        values = _load_half(row_ptr, cols, num_keys)
        beaten_by = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)
        for other_start in range(0, start, BLOCK_J):
            others = _load_half(row_ptr, other_start + tl.arange(0, BLOCK_J), num_keys)
            beaten_by += (others[None, :] >= values[:, None]).to(tl.int32)
        for other_start in range(start, start + BLOCK_I, BLOCK_J):
            other_cols = other_start + tl.arange(0, BLOCK_J)
            others = _load_half(row_ptr, other_cols, num_keys)
            beats = (others[None, :] > values[:, None]) | (
                (others[None, :] == values[:, None]) & (other_cols[None, :] < cols[:, None]))
            beaten_by += beats.to(tl.int32)
        for other_start in range(start + BLOCK_I, num_keys, BLOCK_J):
            others = _load_half(row_ptr, other_start + tl.arange(0, BLOCK_J), num_keys)
            beaten_by += (others[None, :] > values[:, None]).to(tl.int32)
        rank = tl.sum(beaten_by, axis=1)
        keep = (rank < CANDIDATES) & (cols < num_keys)
        tl.store(value_ptr + rank, values, mask=keep)
        tl.store(index_ptr + rank, cols, mask=keep)


@triton.jit
def _candidate(pairs_ptr, slots, value_ptr, index_ptr, num_keys, NUM_PAIRS: tl.constexpr, CANDIDATES: tl.constexpr):
    """The candidates at `slots` of the pair table: (float64 sum, int64 expert); past the end (−∞, 2⁶²), which
    never beats a candidate."""
    valid = slots < NUM_PAIRS
    a = tl.load(pairs_ptr + slots, mask=valid, other=0)
    b = tl.load(pairs_ptr + NUM_PAIRS + slots, mask=valid, other=0)
    sums = tl.load(value_ptr + a).to(tl.float64) + tl.load(value_ptr + CANDIDATES + b).to(tl.float64)
    experts = tl.load(index_ptr + a).to(tl.int64) * num_keys + tl.load(index_ptr + CANDIDATES + b).to(tl.int64)
    sums = tl.where(valid & (sums == sums), sums, float("-inf"))
    return sums, tl.where(valid, experts, 2**62)


@triton.jit
def _product_key_pairs_kernel(
    log_probs_ptr, pairs_ptr, value_ptr, index_ptr, first_ptr, second_ptr, num_keys,
    TOP_K: tl.constexpr, CANDIDATES: tl.constexpr, NUM_PAIRS: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = log_probs_ptr + row * 2 * num_keys
    values = value_ptr + row * 2 * CANDIDATES
    indices = index_ptr + row * 2 * CANDIDATES
    _rank_half(base, values, indices, num_keys, CANDIDATES, BLOCK_I, BLOCK_J)
    _rank_half(base + num_keys, values + CANDIDATES, indices + CANDIDATES, num_keys, CANDIDATES, BLOCK_I, BLOCK_J)
    tl.debug_barrier()  # the halves' stores, made by all threads, are read back by all threads below
    for start in range(0, NUM_PAIRS, BLOCK_P):
        slots = start + tl.arange(0, BLOCK_P)
        sums, experts = _candidate(pairs_ptr, slots, values, indices, num_keys, NUM_PAIRS, CANDIDATES)
        beaten_by = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.int32)
        for other_start in range(0, NUM_PAIRS, BLOCK_Q):
            others = other_start + tl.arange(0, BLOCK_Q)
            other_sums, other_experts = _candidate(pairs_ptr, others, values, indices, num_keys, NUM_PAIRS,
                                                   CANDIDATES)
            beats = (other_sums[None, :] > sums[:, None]) | (
                (other_sums[None, :] == sums[:, None]) & (other_experts[None, :] < experts[:, None]))
            beaten_by += beats.to(tl.int32)
        rank = tl.sum(beaten_by, axis=1)
        keep = (slots < NUM_PAIRS) & (rank < TOP_K)
        tl.store(first_ptr + row * TOP_K + rank, experts // num_keys, mask=keep)
        tl.store(second_ptr + row * TOP_K + rank, experts % num_keys, mask=keep)


def serves(log_probs: torch.Tensor, k: int) -> bool:
    """Whether the kernel serves this selection: float32 log-probabilities and `min(k, N)` ≤ `MAX_CANDIDATES`."""
    return log_probs.dtype == torch.float32 and min(k, log_probs.shape[-1]) <= MAX_CANDIDATES


@torch.library.custom_op("hf_moe::product_key_pairs", mutates_args=())
def product_key_pairs(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`log_probs [..., 2, N]` float32 → `(i [..., k], j [..., k])` int64: the k best pairs (see
    `hf_moe.moe.router.product_key.product_key_top_k`), best first. A custom op, so torch.compile traces it as one
    node."""
    num_keys = log_probs.shape[-1]
    rows = log_probs.contiguous().view(-1, 2, num_keys)
    first = torch.empty(rows.shape[0], k, dtype=torch.int64, device=log_probs.device)
    second = torch.empty_like(first)
    candidates = min(k, num_keys)
    if rows.shape[0]:
        pairs = candidate_pairs(k, candidates, log_probs.device)
        num_pairs = pairs.shape[1]
        values = torch.empty(rows.shape[0], 2, candidates, dtype=torch.float32, device=log_probs.device)
        indices = torch.empty(rows.shape[0], 2, candidates, dtype=torch.int32, device=log_probs.device)
        block_n, block_p = triton.next_power_of_2(num_keys), triton.next_power_of_2(num_pairs)
        _product_key_pairs_kernel[(rows.shape[0],)](
            rows, pairs, values, indices, first, second, num_keys,
            TOP_K=k, CANDIDATES=candidates, NUM_PAIRS=num_pairs,
            BLOCK_I=max(2, min(64, block_n)), BLOCK_J=max(2, min(32, block_n)),
            BLOCK_P=max(2, min(64, block_p)), BLOCK_Q=max(2, min(32, block_p)), num_warps=4,
        )
    shape = (*log_probs.shape[:-2], k)
    return first.view(shape), second.view(shape)


@product_key_pairs.register_fake
def _(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*log_probs.shape[:-2], k)
    return (log_probs.new_empty(shape, dtype=torch.int64), log_probs.new_empty(shape, dtype=torch.int64))
