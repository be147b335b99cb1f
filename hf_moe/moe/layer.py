"""The MoE block: router → (dispatch) → experts → combine, plus optional shared experts."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..configuration_hf_moe import HfMoeConfig
from .experts import HfMoeExperts, run_experts
from .router import RouterOutput, build_router


class HfMoeMLP(nn.Module):
    """Dense SwiGLU MLP (dense layers and shared experts)."""

    def __init__(self, config: HfMoeConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class HfMoeSparseMoeBlock(nn.Module):
    """One mixture-of-experts layer.

    `expert_parallel` is `None` for a single process; `hf_moe.parallel` sets it to an all-to-all dispatcher
    when the experts are sharded over an expert-parallel group. `hf_moe.capture_moe_cuda_graphs` gives it CUDA
    graphs that replace its forward and backward for the training shape they were captured at.
    """

    def __init__(self, config: HfMoeConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.router = build_router(config, layer_idx)
        self.experts = HfMoeExperts(config)
        self.shared_experts = HfMoeMLP(config, config.shared_expert_size) if config.shared_expert_size else None
        self.shared_expert_gate = (
            nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        )
        self.expert_parallel = None
        self._cuda_graph = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        """`[B, S, H]` → `[B, S, H]` and the router's decisions; `token_mask` `[B·S]` marks real tokens,
        `input_ids` `[B, S]` (or `[B·S]`) are the token ids (hash routing needs them)."""
        if self._cuda_graph is not None and self._cuda_graph.serves(self, hidden_states, token_mask):
            return self._cuda_graph(hidden_states, token_mask)
        return self._eager_forward(hidden_states, token_mask, input_ids)

    def _eager_forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = self.router(
            x,
            token_mask,
            input_ids=None if input_ids is None else input_ids.reshape(-1),
            sequence_length=shape[1] if hidden_states.dim() == 3 else None,
        )
        if self.expert_parallel is not None:
            out = self.expert_parallel(x, routing, self.experts)
        elif routing.capacity is None:  # no sentinel slots
            out = self.experts(x, routing.top_k_index, routing.top_k_weights)
        else:
            out = run_experts(self.experts, x, routing.top_k_index, routing.top_k_weights)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.view(shape), routing
