"""Routed experts: SwiGLU MLPs stored as 3D tensors in transformers' layout.

`gate_up_proj [E, 2·I, H]` (gate rows first, then up) and `down_proj [E, H, I]`, so transformers'
`ExpertsInterface` kernels (`eager`, `batched_mm`, `grouped_mm`, ...) and PEFT's `target_parameters` work on
them unchanged. hf-moe registers its own implementation, `hf_moe_grouped`, in the same interface.

Every implementation has the signature `(experts, hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]` and computes `out[t] = Σ_slots weight · down(act(gate(x)) ⊙ up(x))`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..configuration_hf_moe import HfMoeConfig


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

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Reference ("eager") path: one loop over the experts that received tokens."""
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = nn.functional.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`x [S, in]` sorted by expert, `weight [E, out, in]`, `counts [E]` → `[S, out]`."""
    if x.is_cuda and hasattr(torch.nn.functional, "grouped_mm") and x.dtype == torch.bfloat16:
        offsets = counts.cumsum(0).to(torch.int32)
        return torch.nn.functional.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    pieces = x.split(counts.tolist())
    return torch.cat([p @ w.T for p, w in zip(pieces, weight)], dim=0)


def grouped_experts_forward(
    self: HfMoeExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Sort (token, slot) pairs by expert, run each projection as one grouped GEMM, unsort and sum the k slots.

    The combine is a reshape-and-sum over the k slots (no atomics), so it is deterministic.
    """
    num_tokens, top_k = top_k_index.shape
    flat_expert = top_k_index.reshape(-1)
    order = flat_expert.argsort(stable=True)
    counts = torch.zeros(self.num_experts, dtype=torch.int64, device=flat_expert.device)
    counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))  # no device sync, unlike bincount
    x = hidden_states[order // top_k]
    gate, up = _grouped_linear(x, self.gate_up_proj, counts).chunk(2, dim=-1)
    y = _grouped_linear(self.act_fn(gate) * up, self.down_proj, counts)
    y = y * top_k_weights.reshape(-1)[order, None].to(y.dtype)
    unsorted = torch.empty_like(y).index_copy_(0, order, y)
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register("hf_moe_grouped", grouped_experts_forward)
