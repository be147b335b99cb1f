"""Expert capacity: how many (token, expert) slots each expert takes, and which slots drop (the capacity-padded
experts implementation is `hf_moe.moe.experts.capacity_padded`).

Dropped slots follow the shared sentinel contract: their expert index becomes `num_experts` and their
weight 0, so the token keeps only its residual (and its other experts).
"""

from __future__ import annotations

import math

import torch

from ..configuration_hf_moe import HfMoeConfig


def _decimal_ratio(factor: float) -> tuple[int, int]:
    """`factor` as the fraction of the shortest decimal that round-trips to it, as `repr` writes it (`1.1` → 11/10):
    at the fewest decimal places (fewer than zero: tens, hundreds, ...), the decimal nearest the float's exact value
    `a / b`. Integer arithmetic on a constant, which torch.compile folds (it traces neither `repr` nor `Fraction`)."""
    a, b = factor.as_integer_ratio()
    if a == 0:
        return 0, 1
    leading = math.floor(math.log10(abs(factor)))  # the leading digit's place, give or take one
    for places in range(-leading - 1, 19 - leading):
        scale, unit = 10 ** max(places, 0), 10 ** max(-places, 0)
        nearest, rest = divmod(a * scale, b * unit)  # a·scale / (b·unit), rounded half to even as repr does
        nearest += 2 * rest > b * unit or (2 * rest == b * unit and nearest % 2 == 1)
        if nearest * unit / scale == factor:
            common = math.gcd(nearest * unit, scale)
            return nearest * unit // common, scale // common
    return a, b


def expert_capacity(config: HfMoeConfig, num_tokens: int, training: bool) -> int:
    """Slots per expert for a batch of `num_tokens` tokens:
    `min(T, max(min_capacity, ceil(T·k·factor / E)))`, with `capacity_factor` in training and
    `eval_capacity_factor` otherwise. An expert never receives more than T slots, hence the cap.

    The product is computed in exact rational arithmetic, reading the factor as the shortest decimal that
    round-trips to it (`repr`), i.e. the number the user wrote: `1.1` is 11/10, not the binary double just
    above it. Float arithmetic overshoots exact multiples: `ceil(100·1·1.1/10)` gives 12 instead of 11.
    """
    numerator, denominator = _decimal_ratio(config.capacity_factor if training else config.eval_capacity_factor)
    # integer ceil-division keeps a symbolic `num_tokens` (torch.compile dynamic shapes) symbolic
    wanted = -(-num_tokens * config.num_experts_per_tok * numerator // (config.num_experts * denominator))
    return min(num_tokens, max(config.min_capacity, wanted))


def slot_positions(top_k_index: torch.Tensor, num_experts: int, random_priority: bool = False) -> torch.Tensor:
    """Position of every (token, slot) pair in its expert's queue, `[T, k]` int64; with capacity C the slots at
    positions < C stay.

    The queue is ordered by slot column first, then by token: every token's slot 0 (its best expert) queues
    before any token's slot 1, and so on; within one column tokens queue in batch order, or in one uniformly
    random order of the tokens with `random_priority` (random token selection). Sentinel slots (`num_experts`)
    queue in their own bucket, so they take no capacity. Static shapes only (one sort): no host synchronisation.

    Against DeepSpeed's gates (`deepspeed/moe/sharded_moe.py`): for k = 2 this is `top2gating`'s order (a second
    choice's location starts after every first choice of its expert, kept or not). For k = 1, random priority
    keeps a uniformly random subset of each expert's tokens as `top1gating`'s random token selection does;
    without it `top1gating` keeps whichever tokens `torch.topk` returns among equal mask entries (no defined
    order), here the earliest. For k > 2 `topkgating` differs: its default `drop_policy="probs"` keeps each
    expert's slots with the largest gates, and `"position"` queues all of a token's slots together, in batch order.
    """
    num_tokens, top_k = top_k_index.shape
    device = top_k_index.device
    if random_priority:
        token_rank = torch.randperm(num_tokens, device=device)
    else:
        token_rank = torch.arange(num_tokens, device=device)
    priority = torch.arange(top_k, device=device)[None, :] * num_tokens + token_rank[:, None]
    flat_expert = top_k_index.reshape(-1)
    order = (flat_expert * (num_tokens * top_k) + priority.reshape(-1)).argsort()
    # scatter_add, not bincount: bincount's output size depends on the data, which torch.compile cannot trace
    counts = torch.zeros(num_experts + 1, dtype=flat_expert.dtype, device=device)
    counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
    starts = counts.cumsum(0) - counts
    sorted_pos = torch.arange(flat_expert.numel(), device=device) - starts[flat_expert[order]]
    return torch.empty_like(sorted_pos).scatter_(0, order, sorted_pos).view(num_tokens, top_k)


def drop_over_capacity(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    random_priority: bool = False,
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark the slots beyond each expert's `capacity` (queued by [`slot_positions`]) as dropped (index
    `num_experts`, weight 0). The surviving slots keep their weights, unless `renormalize`: then they are rescaled
    to the sum the token's weights had before dropping, as DeepSpeed's `top2gating` / `topkgating` renormalise
    the gates after the capacity mask (a token whose weights summed to 1 gets 1.0 on its one surviving slot). A
    token with no surviving slot keeps weights 0."""
    routed = top_k_index < num_experts
    keep = (slot_positions(top_k_index, num_experts, random_priority) < capacity) & routed
    index = top_k_index.masked_fill(~keep, num_experts)
    weights = top_k_weights.masked_fill(~keep, 0.0)
    if renormalize:
        total = top_k_weights.masked_fill(~routed, 0.0).sum(dim=-1, keepdim=True)
        kept = weights.sum(dim=-1, keepdim=True)
        weights = weights * (total / kept.masked_fill(kept == 0, 1.0))  # no 0/0, even in backward
    return index, weights
