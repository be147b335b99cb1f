"""The routed experts module: SwiGLU MLPs stored as 3D tensors in transformers' layout.

`gate_up_proj [E, 2·I, H]` (gate rows first, then up) and `down_proj [E, H, I]`, so transformers'
`ExpertsInterface` kernels (`eager`, `batched_mm`, `grouped_mm`, ...) and PEFT's `target_parameters` work on
them unchanged. Every implementation has the signature `(experts, hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]` and computes `out[t] = Σ_slots weight · down(act(gate(x)) ⊙ up(x))`; slots whose
expert index is `num_experts` or more (dropped slots) contribute nothing. Switch with
`model.set_experts_implementation(name)`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation

from ...configuration_hf_moe import HfMoeConfig


@use_experts_implementation
class HfMoeExperts(nn.Module):
    """The routed experts of one MoE layer (all of them, or this rank's shard under expert parallelism)."""

    def __init__(self, config: HfMoeConfig, num_experts: int | None = None) -> None:
        super().__init__()
        self.num_experts = config.num_experts if num_experts is None else num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def keep(self, start: int, end: int) -> None:
        """Keep experts [start, end) only (this rank's shard under expert parallelism; works on the meta device)."""
        if not 0 <= start < end <= self.num_experts:
            raise ValueError(f"HfMoeExperts.keep({start}, {end}): expected 0 <= start < end <= {self.num_experts}.")
        self.gate_up_proj = nn.Parameter(self.gate_up_proj.data[start:end].clone())
        self.down_proj = nn.Parameter(self.down_proj.data[start:end].clone())
        self.num_experts = end - start

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """THE reference ("eager") path, one loop over the experts that received tokens: every other
        implementation (`hf_moe_grouped`, `hf_moe_capacity`, `liger_fused`, transformers' own) must compute what
        this computes, and the tests compare them against it."""
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = nn.functional.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


def base_layer(module: nn.Module) -> nn.Module:
    """The hf-moe module under a PEFT wrapper (`target_parameters` LoRA wraps the experts and the router)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module
