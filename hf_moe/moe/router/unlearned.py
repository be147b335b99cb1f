"""Routers without a learned gate: hash routing and the perfectly balanced fake gate (docs/routing.md)."""

from __future__ import annotations

import torch
from transformers import initialization as init

from ...configuration_hf_moe import HfMoeConfig
from ..types import RouterOutput
from .registry import register_router
from .topk import HfMoeRouter


class _UnlearnedRouter(HfMoeRouter):
    """Base of routers without a learned gate: no `weight` (so no parameter that never gets a gradient), zero
    logits and zero losses."""

    learned = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        sequence_length: int | None = None,
    ) -> RouterOutput:
        logits = hidden_states.new_zeros(hidden_states.shape[0], self.num_experts, dtype=torch.float32)
        top_k_index, weights = self.select(logits, logits, input_ids)
        output = self.finish(logits, logits.softmax(-1), top_k_index, weights, hidden_states.dtype, token_mask,
                             sequence_length)
        output.z_loss = logits.new_zeros(())
        return output

    def aux_loss(
        self,
        probs: torch.Tensor,
        top_k_index: torch.Tensor,
        token_mask: torch.Tensor | None,
        sequence_length: int | None,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        return probs.new_zeros(())


@register_router("hash")
class HashRouter(_UnlearnedRouter):
    """Hash routing (Roller et al. 2021, `router_type="hash"`): each token id goes to a fixed set of k distinct
    experts drawn once from `hash_seed` (and the layer index), with weights 1/k. Deterministic, causal, no
    learned gate; needs the input ids (it refuses `inputs_embeds`-only calls). The table is a buffer saved with
    the model, so a checkpoint routes identically whatever torch's random generator does in the future.
    """

    reads_token_ids = True

    def __init__(self, config: HfMoeConfig, layer_idx: int | None = None) -> None:
        super().__init__(config, layer_idx)
        self.register_buffer("hash_table", self._draw_table())

    def _draw_table(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.config.hash_seed * 100_003 + (self.layer_idx or 0))
        keys = torch.rand(self.config.vocab_size, self.num_experts, generator=generator, device="cpu")
        return keys.argsort(dim=-1)[:, : self.top_k].contiguous()

    def initialize(self, std: float) -> None:
        init.copy_(self.hash_table, self._draw_table().to(self.hash_table.device))

    def select(self, logits, scores, input_ids=None):
        if input_ids is None:
            raise ValueError("router_type='hash' routes by token id: call the model with input_ids, not only "
                             "inputs_embeds.")
        top_k_index = self.hash_table.to(input_ids.device)[input_ids.reshape(-1)]
        return top_k_index, torch.full_like(top_k_index, 1.0 / self.top_k, dtype=torch.float32)


@register_router("fake_balanced")
class FakeBalancedRouter(_UnlearnedRouter):
    """Perfectly balanced routing for performance experiments (`router_type="fake_balanced"`, as NeMo
    AutoModel's FakeBalancedGate): slot j of token t goes to expert `(t·k + j) mod E` with weight 1/k.
    `fake_gate_noise` ∈ [0, 1] moves towards random: each token is rerouted to k random distinct experts with
    that probability, and the weights are blended that far towards random ones (still summing to 1).
    The output ignores the content of the tokens: measure speed with it, never quality.
    """

    def select(self, logits, scores, input_ids=None):
        num_tokens, device = logits.shape[0], logits.device
        slots = torch.arange(num_tokens, device=device)[:, None] * self.top_k + torch.arange(self.top_k, device=device)
        top_k_index = slots % self.num_experts
        weights = torch.full((num_tokens, self.top_k), 1.0 / self.top_k, device=device)
        noise = self.config.fake_gate_noise
        if noise > 0:
            random_experts = torch.rand(num_tokens, self.num_experts, device=device).argsort(-1)[:, : self.top_k]
            rerouted = torch.rand(num_tokens, 1, device=device) < noise
            top_k_index = torch.where(rerouted, random_experts, top_k_index)
            weights = (1 - noise) * weights + noise * torch.randn(num_tokens, self.top_k, device=device).softmax(-1)
        return top_k_index, weights
