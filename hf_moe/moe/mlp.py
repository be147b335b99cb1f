"""The dense SwiGLU MLP: the MLP of dense decoder layers and the shared experts of an MoE block."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..configuration_hf_moe import HfMoeConfig


class HfMoeMLP(nn.Module):
    """`down(act(gate(x)) ⊙ up(x))`."""

    def __init__(self, config: HfMoeConfig, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                output_routing: bool = False) -> torch.Tensor | tuple[torch.Tensor, None]:
        """`token_mask` and `input_ids` are what an MoE block routes with; a dense MLP ignores them and, asked for its
        routing (`output_routing`), returns `(output, None)`, so a decoder layer calls either kind the same way."""
        out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return (out, None) if output_routing else out
