"""The router: token → expert choice, and the auxiliary losses that keep experts balanced.

The router returns one small [`RouterOutput`] so that richer routing and expert-parallel dispatch can
slot in without the MoE block or the model changing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configuration_hf_moe import HfMoeConfig


@dataclass
class RouterOutput:
    """What one MoE layer's router decided for a flat batch of T tokens.

    Attributes:
        logits: `[T, E]` float32 router logits.
        top_k_index: `[T, k]` chosen experts.
        top_k_weights: `[T, k]` combine weights (dtype of the hidden states).
        tokens_per_expert: `[E]` routed (token, slot) pairs per expert, padding excluded.
        aux_loss: load-balancing loss of this layer (see [`load_balancing_loss`]).
        z_loss: router z-loss of this layer (see [`router_z_loss`]).
    """

    logits: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


def load_balancing_loss(
    probs: torch.Tensor,
    top_k_index: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/GShard load-balancing loss `E · Σᵢ fᵢ · Pᵢ` for one layer, and the per-expert slot counts.

    `fᵢ` is the number of (token, slot) pairs routed to expert i divided by the number of tokens, `Pᵢ` the
    mean router probability of expert i; padding tokens (`token_mask == False`) count in neither. Under
    perfect balance the loss equals k (the number of experts per token); divide by k for a value of 1.
    This equals transformers' `load_balancing_loss_func` applied to this layer alone.

    With a process `group`, fᵢ and Pᵢ are taken over the tokens of every rank in it (the loss of the concatenated
    batch), through a differentiable all-reduce; under DDP this gives exactly the single-process gradient.
    The returned counts stay local.
    """
    counts = torch.zeros(num_experts, dtype=torch.float32, device=probs.device)
    if token_mask is None:
        counts.scatter_add_(0, top_k_index.reshape(-1), torch.ones_like(top_k_index, dtype=torch.float32).reshape(-1))
        num_tokens = probs.new_tensor(float(probs.shape[0]))
        prob_sum = probs.sum(dim=0)
    else:
        mask = token_mask.to(torch.float32)
        counts.scatter_add_(0, top_k_index.reshape(-1), mask[:, None].expand_as(top_k_index).reshape(-1))
        num_tokens = mask.sum()
        prob_sum = (probs * mask[:, None]).sum(dim=0)
    local_counts = counts
    if group is not None:
        from .dispatch import all_reduce_sum

        counts = all_reduce_sum(counts.detach(), group)
        num_tokens = all_reduce_sum(num_tokens.detach(), group)
        prob_sum = all_reduce_sum(prob_sum, group)
    num_tokens = num_tokens.clamp(min=1.0)
    loss = num_experts * torch.sum((counts / num_tokens) * (prob_sum / num_tokens))
    return loss, local_counts


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss `mean(logsumexp(logits)²)` over real tokens (ST-MoE); keeps router logits small."""
    z = torch.logsumexp(logits, dim=-1).square()
    if token_mask is None:
        return z.mean()
    mask = token_mask.to(z.dtype)
    return (z * mask).sum() / mask.sum().clamp(min=1.0)


class HfMoeRouter(nn.Module):
    """Token-choice top-k router: `logits = x·Wᵣᵀ` in float32 (at least) → softmax → top-k (→ renormalise)."""

    def __init__(self, config: HfMoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.aux_loss_group = None  # a process group: load-balancing loss over all its ranks' tokens

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> RouterOutput:
        """Route `[T, H]` tokens; `token_mask` `[T]` marks real (non-padding) tokens for the statistics."""
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
        logits = F.linear(hidden_states.to(dtype), self.weight.to(dtype))
        probs = logits.softmax(dim=-1)
        top_k_probs, top_k_index = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_probs = top_k_probs / top_k_probs.sum(dim=-1, keepdim=True)
        aux_loss, counts = load_balancing_loss(probs, top_k_index, self.num_experts, token_mask, self.aux_loss_group)
        return RouterOutput(
            logits=logits,
            top_k_index=top_k_index,
            top_k_weights=top_k_probs.to(hidden_states.dtype),
            tokens_per_expert=counts,
            aux_loss=aux_loss,
            z_loss=router_z_loss(logits, token_mask),
        )
