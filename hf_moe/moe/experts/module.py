"""The routed experts modules: MLPs stored as 3D tensors in transformers' layout.

Gated (SwiGLU, the default): `gate_up_proj [E, 2·I, H]` (gate rows first, then up) and `down_proj [E, H, I]`,
`y = down(act(gate(x)) ⊙ up(x))`. Non-gated (`HfMoeConfig(gated_experts=False)`, e.g. relu² experts, or the
singleton experts of product-key layers): `up_proj [E, I, H]` and `down_proj [E, H, I]`, `y = down(act(up(x)))`.
Both layouts are the ones transformers' `ExpertsInterface` kernels (`eager`, `batched_mm`, `grouped_mm`, ...) and
PEFT's `target_parameters` know (`has_gate`). Every implementation has the signature `(experts, hidden_states
[T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]` and computes `out[t] = Σ_slots weight · expert(x)`;
slots whose expert index is `num_experts` or more (dropped slots) contribute nothing. Switch with
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

    has_gate = True
    """SwiGLU experts (`gate_up_proj`); [`HfMoeNonGatedExperts`] sets it False (`up_proj`)."""

    def __init__(self, config: HfMoeConfig, num_experts: int | None = None) -> None:
        super().__init__()
        self.num_experts = config.num_experts if num_experts is None else num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        rows = (2 if self.has_gate else 1) * self.intermediate_dim
        self.register_parameter(self.up_name, nn.Parameter(torch.empty(self.num_experts, rows, self.hidden_dim)))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    @property
    def up_name(self) -> str:
        """Name of the projection read against the input: `gate_up_proj` (gated) or `up_proj`."""
        return "gate_up_proj" if self.has_gate else "up_proj"

    @property
    def input_proj(self) -> torch.Tensor:
        """The projection read against the input: `gate_up_proj [E, 2I, H]` or `up_proj [E, I, H]`."""
        return getattr(self, self.up_name)

    def activation(self, projected: torch.Tensor) -> torch.Tensor:
        """`act(gate) ⊙ up` of a gated projection `[..., 2I]`, `act(up)` of a non-gated one `[..., I]`."""
        if not self.has_gate:
            return self.act_fn(projected)
        gate, up = projected.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def keep(self, start: int, end: int) -> None:
        """Keep experts [start, end) only (this rank's shard under expert parallelism; works on the meta device)."""
        if not 0 <= start < end <= self.num_experts:
            raise ValueError(f"{type(self).__name__}.keep({start}, {end}): expected 0 <= start < end <= "
                             f"{self.num_experts}.")
        setattr(self, self.up_name, nn.Parameter(self.input_proj.data[start:end].clone()))
        self.down_proj = nn.Parameter(self.down_proj.data[start:end].clone())
        self.num_experts = end - start

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """THE reference ("eager") path, one loop over the experts that received tokens: every other
        implementation (`hf_moe_grouped`, `hf_moe_capacity`, `hf_moe_gathered`, `liger_fused`, transformers' own)
        must compute what this computes, and the tests compare them against it."""
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            projected = nn.functional.linear(hidden_states[token_idx], self.input_proj[expert])
            y = nn.functional.linear(self.activation(projected), self.down_proj[expert])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


@use_experts_implementation(has_gate=False)
class HfMoeNonGatedExperts(HfMoeExperts):
    """Non-gated routed experts (`HfMoeConfig(gated_experts=False)`): `up_proj [E, I, H]`, `down_proj [E, H, I]`,
    `y = down(act(up(x)))` with any `hidden_act` (`relu2`: Nemotron-H's experts). With a small
    `moe_intermediate_size` (1: singletons) these are the experts of product-key layers, two `[E, I·H]` tables."""

    has_gate = False


def input_projection(experts: object) -> tuple[torch.Tensor, bool]:
    """`(gate_up_proj, True)` of gated experts or `(up_proj, False)` of non-gated ones, read from whatever holds
    them (the module, or a view of it such as PEFT's merged weights)."""
    gate_up_proj = getattr(experts, "gate_up_proj", None)
    return (gate_up_proj, True) if gate_up_proj is not None else (experts.up_proj, False)


def build_experts(config: HfMoeConfig, num_experts: int | None = None) -> HfMoeExperts:
    """The routed experts `config` asks for: [`HfMoeExperts`] or, with `gated_experts=False`,
    [`HfMoeNonGatedExperts`]."""
    cls = HfMoeExperts if config.gated_experts else HfMoeNonGatedExperts
    return cls(config, num_experts)


def base_layer(module: nn.Module) -> nn.Module:
    """The hf-moe module under a PEFT wrapper (`target_parameters` LoRA wraps the experts and the router)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module
