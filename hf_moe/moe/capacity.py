"""Expert capacity: how many (token, expert) slots each expert takes, and which slots drop (the capacity-padded
experts implementation is `hf_moe.moe.experts.capacity_padded`).

Dropped slots follow the shared sentinel contract: their expert index becomes `num_experts` and their
weight 0, so the token keeps only its residual (and its other experts).
"""

from __future__ import annotations

import math

import torch

from ..configuration_hf_moe import HfMoeConfig


def expert_capacity(config: HfMoeConfig, num_tokens: int, training: bool) -> int:
    """Slots per expert for a batch of `num_tokens` tokens:
    `min(T, max(min_capacity, ceil(T·k·factor / E)))`, with `capacity_factor` in training and
    `eval_capacity_factor` otherwise. An expert never receives more than T slots, hence the cap."""
    factor = config.capacity_factor if training else config.eval_capacity_factor
    wanted = math.ceil(num_tokens * config.num_experts_per_tok * factor / config.num_experts)
    return min(num_tokens, max(config.min_capacity, wanted))


def slot_positions(top_k_index: torch.Tensor, num_experts: int, random_priority: bool = False) -> torch.Tensor:
    """Position of every (token, slot) pair in its expert's queue, `[T, k]` int64.

    Priority follows DeepSpeed's top-1-first order: every token's first choice is queued before any token's
    second choice, and within one choice level tokens queue in batch order (or in a random order with
    `random_priority`: random token selection). Sentinel slots (`num_experts`) queue in their own bucket.
    Static shapes only (one sort), so there is no host synchronisation.
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
    counts = torch.bincount(flat_expert, minlength=num_experts + 1)
    starts = counts.cumsum(0) - counts
    sorted_pos = torch.arange(flat_expert.numel(), device=device) - starts[flat_expert[order]]
    return torch.empty_like(sorted_pos).scatter_(0, order, sorted_pos).view(num_tokens, top_k)


def drop_over_capacity(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    random_priority: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark the slots beyond each expert's `capacity` as dropped (index `num_experts`, weight 0)."""
    keep = (slot_positions(top_k_index, num_experts, random_priority) < capacity) & (top_k_index < num_experts)
    index = top_k_index.masked_fill(~keep, num_experts)
    weights = top_k_weights.masked_fill(~keep, 0.0)
    return index, weights
