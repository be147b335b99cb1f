"""The routed experts: the module, its implementations (registered in transformers' experts interface on import),
the kernel plan of `hf_moe_grouped`, and `run_experts`, the one call a dispatcher makes.

- `module`: `HfMoeExperts` / `HfMoeNonGatedExperts` (their own forward is the eager reference loop), `build_experts`
  and `base_layer` (PEFT unwrapping);
- `grouped`: `hf_moe_grouped`, hf-moe's default (grouped GEMMs, no host sync on CUDA);
- `capacity_padded`: `hf_moe_capacity` (fixed `[E, capacity, H]` buffers, static shapes);
- `gathered`: `hf_moe_gathered` (token-centric: each token gathers its experts' rows; product-key models' default);
- `liger`: `liger_fused` (Liger-Kernel's fused MoE, when installed);
- `plan`: which kernels `hf_moe_grouped` runs (`plan_experts`, `ExpertsPlan`, `override_plan`).
"""

from __future__ import annotations

import torch
from torch import nn

from .capacity_padded import capacity_padded_experts_forward
from .gathered import gathered_experts_forward
from .grouped import grouped_experts_forward, sort_by_expert
from .liger import LIGER_AVAILABLE, liger_fused_experts_forward
from .module import HfMoeExperts, HfMoeNonGatedExperts, base_layer, build_experts
from .plan import ExpertsPlan, WeightGrads, override_plan, plan_experts

SENTINEL_SAFE_IMPLEMENTATIONS = {"eager", "hf_moe_grouped", "hf_moe_capacity", "hf_moe_gathered"}
"""Experts implementations that skip sentinel slots themselves; `run_experts` compacts for the others."""


def run_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_slots: int | None = None,
    weight_grads: WeightGrads | None = None,
) -> torch.Tensor:
    """Run `experts` (possibly wrapped by PEFT) on routing whose slots may be sentinels (index ≥ num_experts):
    dropped by a capacity, or owned by another rank under expert parallelism.

    Implementations that skip sentinels themselves get the routing as is (`hf_moe_grouped` also gets `num_slots`,
    the number of real slots when the caller knows it, and `weight_grads`, where its backward may defer the
    weight gradients). For the others only the real (token, expert) slots are gathered (one host sync), run
    as top-1 slots and summed back per token.
    """
    base = base_layer(experts)
    implementation = base.config._experts_implementation
    if implementation == "hf_moe_grouped" and (num_slots is not None or weight_grads is not None):
        return experts(hidden_states, top_k_index, top_k_weights, num_slots=num_slots, weight_grads=weight_grads)
    if implementation in SENTINEL_SAFE_IMPLEMENTATIONS:
        return experts(hidden_states, top_k_index, top_k_weights)
    token_idx, slot = torch.nonzero(top_k_index < base.num_experts, as_tuple=True)
    y = experts(hidden_states[token_idx], top_k_index[token_idx, slot, None], top_k_weights[token_idx, slot, None])
    return torch.zeros_like(hidden_states).index_add_(0, token_idx, y.to(hidden_states.dtype))


__all__ = [
    "LIGER_AVAILABLE",
    "SENTINEL_SAFE_IMPLEMENTATIONS",
    "ExpertsPlan",
    "HfMoeExperts",
    "HfMoeNonGatedExperts",
    "WeightGrads",
    "base_layer",
    "build_experts",
    "capacity_padded_experts_forward",
    "gathered_experts_forward",
    "grouped_experts_forward",
    "liger_fused_experts_forward",
    "override_plan",
    "plan_experts",
    "run_experts",
    "sort_by_expert",
]
