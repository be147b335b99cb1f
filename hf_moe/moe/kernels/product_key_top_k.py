"""Product-key routing's selection as one Triton kernel: each half's top-k and the k² merge, per (token, head).

One program reads a row's two halves of N log-probabilities once, finds each half's k best keys, forms the k² sums
in registers and extracts the k best of them: no `[T, N²]` tensor, no `[T, k²]` tensor in memory, no host sync.
Every ranking key is the score's order-preserving integer image in the high 32 bits and `2³¹ − 1 − index` in the
low 32, so one integer max gives the best score and, among equal scores, the lower key (halves) or the lower
expert `i·N + j` (merge): the tie rule of `hf_moe.moe.router.product_key`. The selection is not differentiable;
the caller gathers the chosen scores from the log-probabilities with torch ops, whose backward is a scatter into
`[T, heads, 2, N]`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_CANDIDATES = 64
"""Largest `min(k, N)` the kernel serves (its k² sums live in registers); larger selections run the torch path."""


@triton.jit
def _ranking_key(value, index):
    """int64 key ordering by (value desc, index asc) under `max`."""
    bits = value.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed integer order
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def _key_value(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _key_index(key):
    return 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)  # bit 31 of the low word is always 0


@triton.jit
def _half_top_k(row_ptr, num_keys, CANDIDATES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The CANDIDATES best keys of one half `[N]`: their values and indices `[BLOCK_C]`, best first."""
    cols = tl.arange(0, BLOCK_N)
    values = tl.load(row_ptr + cols, mask=cols < num_keys, other=0.0)
    keys = tl.where(cols < num_keys, _ranking_key(values, cols), -(2**63))
    slots = tl.arange(0, BLOCK_C)
    best = tl.full([BLOCK_C], -(2**63), dtype=tl.int64)
    for slot in range(CANDIDATES):
        top = tl.max(keys, axis=0)
        best = tl.where(slots == slot, top, best)
        keys = tl.where(keys == top, -(2**63), keys)
    return _key_value(best), _key_index(best), slots < CANDIDATES


@triton.jit
def _product_key_pairs_kernel(
    log_probs_ptr, first_ptr, second_ptr, num_keys,
    TOP_K: tl.constexpr, CANDIDATES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = log_probs_ptr + row * 2 * num_keys
    value_1, index_1, ok_1 = _half_top_k(base, num_keys, CANDIDATES, BLOCK_N, BLOCK_C)
    value_2, index_2, ok_2 = _half_top_k(base + num_keys, num_keys, CANDIDATES, BLOCK_N, BLOCK_C)
    sums = value_1[:, None] + value_2[None, :]
    experts = index_1[:, None] * num_keys + index_2[None, :]
    keys = tl.where(ok_1[:, None] & ok_2[None, :], _ranking_key(sums, experts), -(2**63))
    for slot in range(TOP_K):
        top = tl.max(tl.max(keys, axis=1), axis=0)
        expert = _key_index(top)
        tl.store(first_ptr + row * TOP_K + slot, (expert // num_keys).to(tl.int64))
        tl.store(second_ptr + row * TOP_K + slot, (expert % num_keys).to(tl.int64))
        keys = tl.where(keys == top, -(2**63), keys)


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
        _product_key_pairs_kernel[(rows.shape[0],)](
            rows, first, second, num_keys, TOP_K=k, CANDIDATES=candidates,
            BLOCK_N=triton.next_power_of_2(num_keys), BLOCK_C=max(2, triton.next_power_of_2(candidates)),
            num_warps=8 if candidates > 32 else 4,
        )
    shape = (*log_probs.shape[:-2], k)
    return first.view(shape), second.view(shape)


@product_key_pairs.register_fake
def _(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*log_probs.shape[:-2], k)
    return (log_probs.new_empty(shape, dtype=torch.int64), log_probs.new_empty(shape, dtype=torch.int64))
