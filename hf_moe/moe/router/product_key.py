"""Product-key routing (`router_type="product_key"`): FlashMoE's Cartesian-product router and PEER's multi-head
product keys over N² experts (docs/product_key.md).

Each head's logits are two halves of N; expert `i·N + j` scores `s(i, j) = log_softmax(half₁)[i] +
log_softmax(half₂)[j]`, so its probability is `p₁[i]·p₂[j]` and the N² probabilities sum to 1. The k best experts
are found exactly from 2N + k² scores, never the N² of them: if `(i, j)` is among the k best pairs, i is among the
k best of half 1 (otherwise the k rows ranked above it, each paired with j, would already be k better pairs), and j
likewise; so the k best of the k² sums of the halves' top-k are the global k best. The log-softmax of a half
subtracts one constant from all its logits, so the router ranks the pairs by the sums of the halves' logits: the same
order, without the log-probabilities' rounding and without writing them.

The order is a total one: pairs rank by the exact sum of their two float32 half scores, formed in float64
(exact whenever neither is more than 2²⁸ times the other in magnitude), and ties go to the lower expert index, in the
halves (lower i / j) and in the merge (lower i·N + j). The argument above, and the kernel's sharper pruning (the
pair of half ranks (a, b) is dominated by (a+1)(b+1) − 1 pairs, so only those with (a+1)(b+1) ≤ k are candidates),
need every pair to rank below the pairs that dominate it; with sums rounded to float32 two different sums can
become equal and the tie rule can then rank a dominated pair first. The returned score is still the float32 sum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...configuration_hf_moe import HfMoeConfig
from ...top_k import top_k_lower_index_first
from .. import kernels
from ..types import RouterOutput
from .losses import expert_counts, router_z_loss, switch_loss_from_sums
from .registry import register_router
from .topk import HfMoeRouter


def product_key_top_k(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`log_probs [..., 2, N]` (each half's log-probabilities, or its logits: they rank alike, see the module
    docstring) → `(index [..., k] int64, score [..., k])`: the k
    largest `log_probs[0, i] + log_probs[1, j]` over all N² pairs, as expert `i·N + j`, best first, ties to the lower
    expert, ranked by exact (float64) sums (see the module docstring). Differentiable in `score` (the two keys'
    inputs added in their dtype; its gradient goes to those two positions). On CUDA with Triton (float32, `min(k, N)`
    ≤ 64) the selection and the scores are one kernel (`hf_moe.moe.kernels.product_key_top_k`) that ranks each half
    and about k·ln k candidate pairs; elsewhere torch ops on `[..., k, k]` and a gather; both choose the same experts
    and give the same scores."""
    if kernels.HAS_TRITON and log_probs.is_cuda and kernels.product_key_top_k.serves(log_probs, k):
        if torch.is_grad_enabled() and log_probs.requires_grad:
            return _KernelScores.apply(log_probs, k)
        index, _, score = kernels.product_key_top_k.product_key_pairs(log_probs.detach(), k)
        return index, score
    index, keys = _pairs_torch(log_probs.detach(), k)
    score = log_probs.flatten(-2).gather(-1, keys.flatten(-2)).unflatten(-1, (2, k)).sum(dim=-2)
    return index, score


class _KernelScores(torch.autograd.Function):
    """The selection kernel's experts and scores, with the scores' backward: each score's gradient added at its two
    keys' positions (what a gather's backward does), so no gather and sum run in forward."""

    @staticmethod
    def forward(ctx, log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        index, keys, score = kernels.product_key_top_k.product_key_pairs(log_probs.detach(), k)
        ctx.save_for_backward(keys)
        ctx.num_keys = log_probs.shape[-1]
        ctx.mark_non_differentiable(index)
        return index, score

    @staticmethod
    def backward(ctx, _grad_index: torch.Tensor | None, grad_score: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keys,) = ctx.saved_tensors
        rows = keys.flatten(-2)  # [..., 2k]: the positions i and N + j in each flattened [..., 2N] row
        grad = grad_score.new_zeros(*keys.shape[:-2], 2 * ctx.num_keys)
        grad.scatter_add_(-1, rows, grad_score.unsqueeze(-2).expand(keys.shape).flatten(-2))
        return grad.unflatten(-1, (2, ctx.num_keys)), None


def _pairs_torch(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(experts [..., k], keys [..., 2, k])` of the k best pairs (see [`product_key_top_k`]) with torch ops: the
    experts `i·N + j` and their keys' positions `i`, `N + j` in the flattened `[..., 2·N]` row."""
    num_keys = log_probs.shape[-1]
    candidates = min(k, num_keys)
    values, index = top_k_lower_index_first(log_probs, candidates)  # [..., 2, c]
    values = values.double()  # exact sums of float32 halves: the order of the module docstring
    sums = values[..., 0, :, None] + values[..., 1, None, :]  # [..., c, c]
    experts = index[..., 0, :, None] * num_keys + index[..., 1, None, :]
    sums, experts = sums.flatten(-2), experts.flatten(-2)
    by_expert = experts.argsort(dim=-1)  # the merge's ties go to the lower expert: rank candidates in expert order
    _, best = top_k_lower_index_first(sums.gather(-1, by_expert), k)
    chosen = experts.gather(-1, by_expert.gather(-1, best))
    first = torch.div(chosen, num_keys, rounding_mode="floor")
    return chosen, torch.stack([first, chosen - first * num_keys + num_keys], dim=-2)


class ProductKeyStatistics:
    """A product-key router's statistics, computed when its [`RouterOutput`] is read, from the halves' logits
    `[T, heads, 2, N]` (their log-probabilities and probabilities computed once, for the aux loss and the entropy,
    and only when a statistic is read)."""

    def __init__(self, router: ProductKeyRouter, halves: torch.Tensor) -> None:
        self.router = router
        self.halves = halves
        self._log_probs: torch.Tensor | None = None
        self._probs: torch.Tensor | None = None

    @property
    def log_probs(self) -> torch.Tensor:
        if self._log_probs is None:
            self._log_probs = self.halves.log_softmax(dim=-1)
        return self._log_probs

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None:
            self._probs = self.log_probs.exp()
        return self._probs

    def tokens_per_expert(self, output: RouterOutput) -> torch.Tensor:
        return expert_counts(output.top_k_index, self.router.num_experts, output.token_mask)

    def aux_loss(self, output: RouterOutput) -> torch.Tensor:
        mask = None if output.token_mask is None else output.token_mask.to(self.probs.dtype)
        return self.router.aux_loss(self.probs, output.tokens_per_expert, mask)

    def token_entropy(self, output: RouterOutput) -> torch.Tensor:
        """The sum of the halves' entropies, averaged over heads."""
        return -(self.probs * self.log_probs).sum(dim=(-2, -1)).mean(dim=-1)

    def z_loss(self, output: RouterOutput) -> torch.Tensor:
        """The z-loss of each head's two halves, each half a softmax over its N logits."""
        mask = output.token_mask
        halves = 2 * self.router.num_heads
        return router_z_loss(output.logits.view(-1, self.router.num_keys),
                             None if mask is None else mask.repeat_interleave(halves))


@register_router("product_key")
class ProductKeyRouter(HfMoeRouter):
    """Product-key router over `num_experts = N²` experts (`router_type="product_key"`; FlashMoE, and PEER with
    `product_key_heads > 1`).

    `logits = W·norm(x)`, `[T, heads·2N]` float32 (`norm`: `product_key_query_norm`); per head the k experts of the
    largest `p₁[i]·p₂[j]` (found exactly from the halves' top-k, see the module docstring), combined with weights
    `p₁[i]·p₂[j]`, renormalised over the head's k when `norm_topk_prob` (then equal to PEER's softmax over the k
    selected key scores), times `routed_scaling_factor`. A token's `heads·k` slots are the heads' k in head order.

    Statistics never build a `[T, N²]` tensor: the switch loss sums `p₁ ⊗ p₂` over tokens into `[N, N]`, the
    z-loss is taken per half, and the routing entropy is the sum of the halves' entropies (averaged over heads).
    """

    def __init__(self, config: HfMoeConfig, layer_idx: int | None = None) -> None:
        self.num_keys = math.isqrt(config.num_experts)
        self.num_heads = config.product_key_heads
        super().__init__(config, layer_idx)
        norm = config.product_key_query_norm
        batch_statistics = norm in ("batch_norm", "running_norm")  # both keep BatchNorm's buffers
        self.norm = nn.BatchNorm1d(config.hidden_size, affine=False) if batch_statistics else None
        self.layer_norm_query = norm == "layer_norm"
        self.running_norm = norm == "running_norm"
        if self.running_norm:  # the last training batch's (mean, var) and the (mean, var) it was standardised with
            self.register_buffer("last_batch_statistics", torch.full((2, config.hidden_size), math.nan),
                                 persistent=False)
            self.register_buffer("last_used_statistics", torch.ones(2, config.hidden_size), persistent=False)
        self.scaling = config.routed_scaling_factor  # read once: a config attribute costs µs of host time per read

    @property
    def num_logits(self) -> int:
        return self.num_heads * 2 * self.num_keys

    @property
    def is_causal(self) -> bool:
        """Batch statistics (BatchNorm in training) mix the tokens of the batch; everything else is per token."""
        return not (self.norm is not None and self.training and not self.running_norm)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`W·norm(x)` in float32 (as [`HfMoeRouter.compute_logits`], after the query normalisation)."""
        if self.running_norm:
            hidden_states = self.standardise(hidden_states)
        elif self.norm is not None:
            hidden_states = self.norm(hidden_states)
        elif self.layer_norm_query:
            hidden_states = F.layer_norm(hidden_states, hidden_states.shape[-1:])
        return super().compute_logits(hidden_states)

    def initialize(self, std: float) -> None:
        super().initialize(std)
        if self.running_norm:
            nn.init.constant_(self.last_batch_statistics, math.nan)  # equal to no batch
            nn.init.ones_(self.last_used_statistics)

    def standardise(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`product_key_query_norm="running_norm"`: each feature standardised with the BatchNorm buffers' running
        mean and variance, in training too, so a token's routing never depends on the rest of its batch; a training
        batch of two or more tokens then updates the statistics (BatchNorm's momentum and unbiased variance),
        without gradient.

        A gradient checkpoint recomputes the forward in backward, after the statistics moved: the recomputed
        routing would differ from the forward's and the gradients be wrong. So a training batch whose statistics
        equal the last one's bit for bit is that batch again: it is standardised with what the last one used and
        updates nothing (device-side selects, no host sync). Feeding one batch twice in a row counts it once."""
        norm = self.norm
        mean, var = norm.running_mean, norm.running_var
        if self.training and hidden_states.shape[0] > 1:
            with torch.no_grad():
                batch = hidden_states.detach().to(mean.dtype)
                seen = torch.stack([batch.mean(dim=0), batch.var(dim=0)])
                again = (seen == self.last_batch_statistics).all()
                used = torch.where(again, self.last_used_statistics, torch.stack([mean, var]))
                mean, var = used  # this batch is standardised with the statistics before it
                self.last_batch_statistics.copy_(seen)
                self.last_used_statistics.copy_(used)
                for buffer, batch_value in zip((norm.running_mean, norm.running_var), seen):
                    buffer.copy_(torch.where(again, buffer, buffer.lerp(batch_value, norm.momentum)))
                norm.num_batches_tracked.add_((~again).to(norm.num_batches_tracked.dtype))
        return F.batch_norm(hidden_states, mean, var, training=False, eps=norm.eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        sequence_length: int | None = None,
    ) -> RouterOutput:
        num_tokens = hidden_states.shape[0]
        logits = self.compute_logits(hidden_states)
        halves = logits.view(num_tokens, self.num_heads, 2, self.num_keys)
        # A half's log-softmax subtracts one constant from all its logits, so the logits rank the pairs as the
        # log-probabilities do (exactly, without their rounding) and no [T, heads·2N] log-probabilities are written.
        top_k_index, score = product_key_top_k(halves, self.top_k)  # [T, heads, k]: l₁[i] + l₂[j]
        if self.norm_topk_prob:  # p₁p₂ renormalised over the head's k: a softmax of the logit sums
            weights = score.softmax(dim=-1)
        else:  # p₁p₂ = exp(l₁[i] + l₂[j] − lse₁ − lse₂), each half's lse read off its log-softmax at key 0: one
            # fused kernel where torch's logsumexp issues about nine (the forward is host-bound at some 1000s of tokens)
            lse = (halves[..., :1] - halves.log_softmax(dim=-1)[..., :1]).sum(dim=(-2, -1))
            weights = (score - lse[..., None]).exp()
        if self.scaling != 1.0:
            weights = weights * self.scaling
        top_k_index, weights = top_k_index.flatten(1), weights.flatten(1)
        return RouterOutput(
            logits=logits,
            top_k_index=top_k_index,
            top_k_weights=weights.to(hidden_states.dtype),
            token_mask=token_mask,
            statistics=ProductKeyStatistics(self, halves),
        )

    def aux_loss(self, probs: torch.Tensor, counts: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The switch loss `E · Σₑ fₑ·Pₑ` with `Pₑ` the mean over tokens and heads of `p₁[i]·p₂[j]`, summed as
        `Σₜ p₁ᵀ p₂` (`[N, N]`, never `[T, N²]`)."""
        if self.config.router_aux_loss_type == "none":
            return probs.new_zeros(())
        first, second = probs[:, :, 0], probs[:, :, 1]  # [T, heads, N]
        if mask is not None:
            first = first * mask[:, None, None]
        prob_sum = torch.einsum("thi,thj->ij", first, second).reshape(-1) / self.num_heads
        num_tokens = probs.shape[0] if mask is None else mask.sum()
        return switch_loss_from_sums(counts, prob_sum, num_tokens, self.num_experts, self.loss_reduction)
