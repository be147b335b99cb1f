"""Expert-choice routing: every expert picks its tokens (docs/routing.md)."""

from __future__ import annotations

import torch

from ..capacity import expert_capacity
from ..types import RouterOutput, assigned_slots
from .registry import register_router
from .topk import HfMoeRouter, SelectionStatistics


@register_router("expert_choice")
class ExpertChoiceRouter(HfMoeRouter):
    """Expert-choice routing (Zhou et al. 2022, `router_type="expert_choice"`): every expert takes the
    `capacity` tokens that score it highest, so a token gets 0..E experts and the load is balanced by
    construction (the aux loss is 0).

    `top_k_index` is `[T, E]`: column e holds e where expert e took the token, else the sentinel. The weight is
    the token's score for that expert (times `routed_scaling_factor`; `norm_topk_prob` does not apply).

    Not causal: which tokens an expert takes depends on every other token of the batch, including later
    positions of the same sequence. `generate` therefore refuses models with this router (there is no
    token-choice fallback, which would silently change the function the model was trained as).
    """

    is_causal = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        sequence_length: int | None = None,
    ) -> RouterOutput:
        logits = self.compute_logits(hidden_states)
        scores = self.score(logits)
        num_tokens = logits.shape[0]
        capacity = expert_capacity(self.config, num_tokens, self.training)
        selection = self.selection_scores(logits, scores)
        if token_mask is not None:
            selection = selection.masked_fill(~token_mask[:, None], float("-inf"))
        chosen = selection.topk(capacity, dim=0).indices  # [capacity, E] token ids per expert
        taken = torch.ones_like(chosen, dtype=torch.bool) if token_mask is None else token_mask[chosen]
        expert_ids = torch.arange(self.num_experts, device=logits.device).expand_as(chosen)
        top_k_index = torch.full_like(logits, self.num_experts, dtype=torch.long)
        top_k_index.scatter_(0, chosen, expert_ids.masked_fill(~taken, self.num_experts))
        weights = torch.zeros_like(scores).scatter(0, chosen, scores.gather(0, chosen) * taken)
        weights = weights * self.config.routed_scaling_factor
        real = (torch.ones(num_tokens, device=logits.device) if token_mask is None else token_mask.float())
        untouched = (assigned_slots(top_k_index, self.num_experts).sum(1) == 0).float() * real
        return RouterOutput(
            logits=logits,
            top_k_index=top_k_index,
            top_k_weights=weights.to(hidden_states.dtype),
            aux_loss=logits.new_zeros(()),
            probs=self.routing_probs(scores),
            token_mask=token_mask,
            capacity=capacity,
            drop_fraction=untouched.sum() / real.sum().clamp(min=1.0),
            statistics=SelectionStatistics(self, top_k_index),  # the counts, on read
        )
