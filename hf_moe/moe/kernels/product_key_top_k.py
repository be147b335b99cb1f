"""Product-key routing's selection as one Triton kernel: each half's top-k and the merge, per (token, head).

One program per row (token, head), never by repeated maxima:

1. Halves. Each key is packed into one int64 that orders keys best first (larger logit, ties to the lower index),
   and each half's c = min(k, N) best are kept, sorted, in registers: by c maxima in turn for c ≤ 8 (each a warp
   reduction; fewer instructions than a sort), else by a bitonic top-k (`tl.topk`, N·log² c compare-exchanges rather
   than N² comparisons).
2. Merge. With both halves sorted, the pair of ranks (a, b) has the (a+1)(b+1) − 1 pairs (a' ≤ a, b' ≤ b) ranked
   above it, so it can be among the k best only if (a+1)(b+1) ≤ k: about k·ln k candidates instead of k². They
   come from a small device table of rank pairs ([`candidate_pairs`]), read from the halves with `tl.gather`; each
   candidate's rank is the number of candidates that beat it (larger sum, or an equal sum at a lower expert
   `i·N + j`), counted over tiles, and the candidates of rank < k are stored at output position rank.

The sums are formed in float64, where the sum of two float32 inputs is exact (whenever neither is more than 2²⁸
times the other in magnitude, or one is 0): the pruning in step 2 is exact only when every pair ranks strictly below
the pairs that dominate it, which exact sums with ties to the lower expert guarantee and rounded float32 sums do
not (two different sums can round to one, and the tie rule may then put the dominated pair first). The torch path
of `hf_moe.moe.router.product_key` ranks by the same float64 sums, so both choose the same experts. NaN inputs rank
as −∞, so every output slot is written with an index in range. The kernel also writes each chosen pair's score (its
two inputs added in float32); it is not differentiable: the caller's backward scatters the scores' gradients to the
keys' positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .library import register_kernel_op

MAX_CANDIDATES = 64
"""Largest `min(k, N)` the kernel serves; larger selections run the torch path."""

MAX_CHUNK = 512
"""Keys of a half held at once by the halves' top-k; longer halves are merged chunk by chunk."""

# Candidates ranked per tile side in the merge. A row's work is small and bound by latency, so one warp per row
# keeps the most rows in flight; at one warp 32 × 32 tiles fit its registers
# (docs/decisions/product-key-kernels.md).
_BLOCK_PAIRS = 32
# Largest c whose halves are selected by c maxima in turn rather than sorted (faster up to c 8, slower from 16;
# docs/decisions/product-key-kernels.md).
_ITERATED_MAXIMA: tl.constexpr = tl.constexpr(8)

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
def _half_keys(log_probs_ptr, cols, num_keys):
    """`[2, BLOCK]` int64 keys of both halves at `cols`, larger = better: the value's order-preserving int32 image in
    the high 32 bits, `2³¹ − 1 − index` in the low ones (equal values: the lower index wins). NaN ranks as −∞;
    past the half's end −∞ at an index above every key's, so those keys rank last."""
    offsets = tl.arange(0, 2)[:, None] * num_keys + cols[None, :]
    values = tl.load(log_probs_ptr + offsets, mask=cols[None, :] < num_keys, other=float("-inf"))
    values = tl.where(values == values, values, float("-inf"))
    bits = tl.where(values == 0, 0.0, values).to(tl.int32, bitcast=True)  # −0 ranks with +0
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols[None, :]).to(tl.int64)


@triton.jit
def _top(keys, BLOCK_K: tl.constexpr):
    """`[2, BLOCK_K]`: the largest keys of each row of `keys [2, BLOCK_N]` (distinct within a row), largest first."""
    if BLOCK_K <= _ITERATED_MAXIMA:
        best = tl.full([2, BLOCK_K], -(2**63), tl.int64)
        ranks = tl.arange(0, BLOCK_K)[None, :]
        for rank in tl.static_range(BLOCK_K):
            top = tl.max(keys, axis=1)[:, None]
            best = tl.where(ranks == rank, top, best)
            keys = tl.where(keys == top, -(2**63), keys)
        return best
    else:
        return tl.topk(keys, BLOCK_K)


@triton.jit
def _decode(best):
    """Keys of `_half_keys` → (float64 value, int64 index)."""
    ordered = (best >> 32).to(tl.int32)
    values = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True).to(tl.float64)
    return values, (0x7FFFFFFF - (best & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _candidates(pairs_ptr, slots, v1, i1, v2, i2, num_keys, NUM_PAIRS: tl.constexpr):
    """The candidates at `slots` of the pair table, read from the halves in registers: (float64 sum, int64 expert);
    past the end (−∞, 2⁶²), which never beats a candidate."""
    valid = slots < NUM_PAIRS
    a = tl.load(pairs_ptr + slots, mask=valid, other=0)
    b = tl.load(pairs_ptr + NUM_PAIRS + slots, mask=valid, other=0)
    sums = tl.gather(v1, a, 0) + tl.gather(v2, b, 0)
    experts = tl.gather(i1, a, 0) * num_keys + tl.gather(i2, b, 0)
    sums = tl.where(valid & (sums == sums), sums, float("-inf"))
    return sums, tl.where(valid, experts, 2**62)


@triton.jit
def _product_key_pairs_kernel(
    log_probs_ptr, pairs_ptr, expert_ptr, key_ptr, score_ptr, num_keys,
    TOP_K: tl.constexpr, NUM_PAIRS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = log_probs_ptr + row * 2 * num_keys
    best = _top(_half_keys(base, tl.arange(0, BLOCK_N), num_keys), BLOCK_K)
    for start in range(BLOCK_N, num_keys, BLOCK_N):
        chunk = _top(_half_keys(base, start + tl.arange(0, BLOCK_N), num_keys), BLOCK_K)
        best = tl.bitonic_merge(tl.maximum(best, tl.flip(chunk, 1)), descending=True)
    first_half = tl.arange(0, 2)[:, None] == 0  # the halves' keys are negative or not: sum, not max, picks a row
    v1, i1 = _decode(tl.sum(tl.where(first_half, best, 0), axis=0))
    v2, i2 = _decode(tl.sum(tl.where(first_half, 0, best), axis=0))
    for start in range(0, NUM_PAIRS, BLOCK_P):
        slots = start + tl.arange(0, BLOCK_P)
        sums, experts = _candidates(pairs_ptr, slots, v1, i1, v2, i2, num_keys, NUM_PAIRS)
        beaten_by = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.int32)
        for other_start in range(0, NUM_PAIRS, BLOCK_Q):
            others = other_start + tl.arange(0, BLOCK_Q)
            other_sums, other_experts = _candidates(pairs_ptr, others, v1, i1, v2, i2, num_keys, NUM_PAIRS)
            beats = (other_sums[None, :] > sums[:, None]) | (
                (other_sums[None, :] == sums[:, None]) & (other_experts[None, :] < experts[:, None]))
            beaten_by += beats.to(tl.int32)
        rank = tl.sum(beaten_by, axis=1)
        keep = (slots < NUM_PAIRS) & (rank < TOP_K)
        first = experts // num_keys
        second = experts - first * num_keys + num_keys
        score = tl.load(base + first, mask=keep, other=0.0) + tl.load(base + second, mask=keep, other=0.0)
        tl.store(expert_ptr + row * TOP_K + rank, experts, mask=keep)
        tl.store(key_ptr + row * 2 * TOP_K + rank, first, mask=keep)
        tl.store(key_ptr + (row * 2 + 1) * TOP_K + rank, second, mask=keep)
        tl.store(score_ptr + row * TOP_K + rank, score, mask=keep)


def serves(log_probs: torch.Tensor, k: int) -> bool:
    """Whether the kernel serves this selection: float32 log-probabilities and `min(k, N)` ≤ `MAX_CANDIDATES`."""
    return log_probs.dtype == torch.float32 and min(k, log_probs.shape[-1]) <= MAX_CANDIDATES


def _product_key_pairs(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`log_probs [..., 2, N]` float32 → `(experts [..., k], keys [..., 2, k])` int64 and `scores [..., k]`
    float32: the k best pairs (see `hf_moe.moe.router.product_key.product_key_top_k`), best first, as experts
    `i·N + j`, as the positions of their two keys in the flattened `[..., 2·N]` row (`i`, then `N + j`, where a
    backward scatters), and their scores `log_probs[i] + log_probs[N + j]` (a float32 addition, as a gather and a
    sum would give)."""
    num_keys = log_probs.shape[-1]
    rows = log_probs.contiguous().view(-1, 2, num_keys)
    experts = torch.empty(rows.shape[0], k, dtype=torch.int64, device=log_probs.device)
    keys = torch.empty(rows.shape[0], 2, k, dtype=torch.int64, device=log_probs.device)
    scores = torch.empty(rows.shape[0], k, dtype=torch.float32, device=log_probs.device)
    candidates = min(k, num_keys)
    if rows.shape[0]:
        pairs = candidate_pairs(k, candidates, log_probs.device)
        num_pairs = pairs.shape[1]
        block_p = triton.next_power_of_2(num_pairs)
        _product_key_pairs_kernel[(rows.shape[0],)](
            rows, pairs, experts, keys, scores, num_keys, TOP_K=k, NUM_PAIRS=num_pairs,
            BLOCK_K=max(2, triton.next_power_of_2(candidates)),
            BLOCK_N=max(2, min(MAX_CHUNK, triton.next_power_of_2(num_keys))),
            BLOCK_P=max(2, min(_BLOCK_PAIRS, block_p)), BLOCK_Q=max(2, min(_BLOCK_PAIRS, block_p)), num_warps=1,
        )
    batch = log_probs.shape[:-2]
    return experts.view(*batch, k), keys.view(*batch, 2, k), scores.view(*batch, k)


def _fake(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = log_probs.shape[:-2]
    return (log_probs.new_empty((*batch, k), dtype=torch.int64),
            log_probs.new_empty((*batch, 2, k), dtype=torch.int64), log_probs.new_empty((*batch, k)))


product_key_pairs = register_kernel_op("product_key_pairs", _product_key_pairs, _fake)
