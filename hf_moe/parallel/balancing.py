"""Aux-loss-free load balancing (DeepSeek-V3): move each router's `expert_bias` towards balance.

Routers built with `use_expert_bias=True` add `expert_bias` to the scores they rank (never to the combine
weights) and, in training mode, count their selections. Call [`update_expert_bias`] once per optimizer step:
the counts of every micro-batch since the last call (gradient accumulation) decide the step, whose rule is
[`hf_moe.moe.router.losses.expert_bias_step`]. Here because the counts are summed over ranks first.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..moe.router.losses import expert_bias_step
from ..moe.router.topk import HfMoeRouter


@torch.no_grad()
def update_expert_bias(
    model: nn.Module, rate: float | None = None, process_group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """Move every router's `expert_bias` by `rate` towards balance and reset its selection counts.

    Each expert's bias goes up by `rate` if it was selected less than the mean since the last update, down by
    `rate` if more, and stays if exactly at the mean (`bias += rate · sign(mean load − load)`). `rate` defaults
    to `config.expert_bias_update_rate`. Under torch.distributed the counts are summed over `process_group`
    (default: all ranks) first, so every replica applies the same update. Routers that saw no tokens since the
    last update are left alone. Only counting is in the hot path; this function syncs once per call.

    Returns the per-layer selection counts `[E]` the update used (useful for logging). Gradient checkpointing
    re-runs the forward and so counts every micro-batch twice; the sign of each expert's imbalance, hence the
    update, is unchanged.
    """
    routers = [m for m in model.modules() if isinstance(m, HfMoeRouter) and m.expert_bias is not None]
    if not routers:
        raise ValueError("update_expert_bias: the model has no router with an expert_bias; build it with "
                         "HfMoeConfig(use_expert_bias=True) and router_type 'topk' or 'switch'.")
    if rate is None:
        rate = routers[0].config.expert_bias_update_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (rate >= 0 and math.isfinite(rate)):
        raise ValueError(f"update_expert_bias: rate={rate!r} is invalid: expected a finite number >= 0.")
    device = routers[0].expert_bias.device
    loads = torch.stack([r.take_expert_load().to(device) for r in routers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads, group=process_group)
    for router, load in zip(routers, loads):
        router.expert_bias.add_(expert_bias_step(load, rate).to(router.expert_bias.device))
    return list(loads)
