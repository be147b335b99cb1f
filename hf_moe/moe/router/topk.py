"""The token-choice top-k router [`HfMoeRouter`] (the base class of the other routers) and [`SwitchRouter`].

Also the parts only they use: the float32-accumulated router GEMM and the choice of the fused softmax → top-k
kernel (docs/routing.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ...configuration_hf_moe import HfMoeConfig
from ...top_k import top_k_lower_index_first
from .. import kernels
from ..capacity import drop_over_capacity, expert_capacity
from ..types import RouterOutput, assigned_slots
from .losses import Reduction, expert_counts, sequence_load_balancing_loss, switch_loss
from .registry import register_router

_HALF_DTYPES = (torch.bfloat16, torch.float16)
_FULL_DTYPES = (torch.float32, torch.float64)
FUSED_TOP_K_MIN_EXPERTS = 32
"""Fewest experts for which the router fuses softmax → top-k into one kernel: with many experts `torch.topk` is
most of the router's GPU time and the fused kernel wins; with few (Mixtral's 8) torch's ops are faster
(docs/decisions/fused-router-top-k.md)."""
# Router hooks a subclass may override; a router that overrides none of them routes as `HfMoeRouter` does.
_SELECTION_HOOKS = ("score", "selection_scores", "select", "routing_probs")


def _float32_accumulated_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x [T, H] @ weight [E, H]ᵀ` of half-precision operands, accumulated in and returned as float32."""
    if x.is_cuda:  # cuBLAS: half operands, float32 accumulation and float32 output
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return torch.mm(x.float(), weight.float().t())  # no such kernel elsewhere: same values through float32


class _Float32AccumulatedLinear(torch.autograd.Function):
    """`x [T, H] @ weight [E, H]ᵀ` of half-precision operands → float32 `[T, E]`; gradients in the operands'
    dtypes. Saves only the half operands (no float32 copy of x lives until backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _float32_accumulated_mm(x, weight)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad_logits.to(x.dtype)  # as a half-precision linear layer followed by `.float()` would do
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def _half_operands_float32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits `x·Wᵀ` in float32 from bf16/fp16 `x [..., H]` and `weight [E, H]`: the float32 GEMM's result
    (up to summation order) at the cost of a half-precision GEMM; `x.grad` comes back in x's dtype. Without
    gradients (inference) the GEMM runs as it is, without the autograd Function's host cost."""
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # the MoE block's [T, H]: no view op to issue
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        logits = _Float32AccumulatedLinear.apply(flat, weight)
    else:
        logits = _float32_accumulated_mm(flat, weight)
    return logits if x.dim() == 2 else logits.view(*x.shape[:-1], weight.shape[0])


@register_router("topk")
class HfMoeRouter(nn.Module):
    """Token-choice top-k router (`router_type="topk"`), and the base class of the other routers.

    `logits = x·Wᵣᵀ` in float32 → scores (softmax, or sigmoid) → selection → combine weights:

    - softmax, top-k of the probabilities, weights renormalised to sum to 1 when `norm_topk_prob`
      (Mixtral/Qwen); `topk_before_softmax` picks the k largest logits and softmaxes those k instead;
    - sigmoid scores, weights renormalised when `norm_topk_prob` (DeepSeek-V3);
    - `n_group`/`topk_group`: only experts of the `topk_group` best groups, a group scored by the sum of its
      top-2 scores or by its best score (`group_score`);
    - weights times `routed_scaling_factor`.

    Selection (never the weights) adds `expert_bias` (aux-loss-free balancing) and, in training, Gumbel noise;
    jitter multiplies the router input in training. With `drop_tokens`, slots beyond each expert's capacity
    become sentinels; the surviving weights stay as they are, or are rescaled to the token's total before
    dropping with `renormalize_after_drop` (DeepSpeed).
    """

    is_causal = True
    """A token's experts depend on that token alone, so cached generation routes as the full forward does."""
    learned = True
    """Has a trainable gate `weight [E, H]`."""
    reads_token_ids = False
    """Routes by token id: the MoE block passes it `input_ids` (only routers that set this get them)."""

    def __init__(self, config: HfMoeConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        # the settings read on every call, held as plain attributes: a config attribute read costs a microsecond or
        # more of host time (transformers' config __getattribute__), which decoding pays per layer and step
        self.scoring_func = config.scoring_func
        self.n_group = config.n_group
        self.topk_before_softmax = config.topk_before_softmax
        self.routed_scaling_factor = config.routed_scaling_factor
        self.drop_tokens = config.drop_tokens
        self.weight = nn.Parameter(torch.empty(self.num_logits, config.hidden_size)) if self.learned else None
        if config.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.loss_reduction: Reduction | None = None
        """Differentiable sum over ranks for the switch loss (see [`set_loss_reduction`]); None: this rank only."""
        self.expert_load: torch.Tensor | None = None
        """Selections per expert since the last `update_expert_bias` (training only; not a buffer, so DDP's
        buffer broadcast leaves each rank's own counts alone)."""
        self.fusable_softmax_top_k = (
            config.scoring_func == "softmax"
            and self.expert_bias is None
            and config.n_group is None
            and not config.topk_before_softmax
            and FUSED_TOP_K_MIN_EXPERTS <= self.num_experts <= 1024
            and self.top_k <= self.num_experts
            and all(getattr(type(self), hook) is getattr(HfMoeRouter, hook) for hook in _SELECTION_HOOKS)
        )
        """The part of [`fuses_softmax_top_k`] that the config and the class decide, settled once."""

    @property
    def num_logits(self) -> int:
        """Rows of the gate `weight`: one logit per expert (routers that score experts otherwise override it)."""
        return self.config.num_experts

    def set_loss_reduction(self, reduce: Reduction | None) -> None:
        """Take the switch load-balancing loss over the tokens of several ranks: `reduce(t)` returns the
        differentiable sum of `t` over them (`hf_moe.parallel` installs it); `None` keeps it to this rank's tokens."""
        if reduce is not None and not callable(reduce):
            raise ValueError(f"set_loss_reduction: expected a callable or None, got {reduce!r}.")
        self.loss_reduction = reduce

    def take_expert_load(self) -> torch.Tensor:
        """`[E]` selections per expert since the last call (zeros if none), and start counting afresh."""
        load = self.expert_load if self.expert_load is not None else torch.zeros_like(self.expert_bias)
        self.expert_load = None
        return load

    def initialize(self, std: float) -> None:
        """Initial weights (called from the model's `_init_weights`; skips what a checkpoint loaded)."""
        if self.weight is not None:
            init.normal_(self.weight, mean=0.0, std=std)
        if self.expert_bias is not None:
            init.zeros_(self.expert_bias)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`x·Wᵣᵀ` in float32 (float64 for a float64 model), after jitter in training.

        In a bf16/fp16 model (x and the gate of the same half dtype, no jitter) the GEMM takes the half operands
        as they are and accumulates and returns float32 ([`_half_operands_float32_logits`]): the same logits as a
        float32 GEMM of the upcast values, without a float32 copy of x or float32 GEMMs in backward.
        """
        jitter = self.training and self.config.router_jitter_noise > 0
        if hidden_states.dtype in _HALF_DTYPES and self.weight.dtype == hidden_states.dtype and not jitter:
            return _half_operands_float32_logits(hidden_states, self.weight)
        x = hidden_states if hidden_states.dtype in _FULL_DTYPES else hidden_states.float()
        if jitter:
            eps = self.config.router_jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.linear(x, weight)

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def selection_scores(self, logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """What top-k ranks: the scores, plus Gumbel noise in training and the aux-loss-free bias."""
        if self.training and self.config.router_gumbel_noise:
            gumbel = -torch.empty_like(logits).exponential_().log()
            scores = self.score(logits + gumbel)
        if self.expert_bias is not None:
            scores = scores + self.expert_bias
        return scores

    def select(
        self, logits: torch.Tensor, scores: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(top_k_index [T, k], top_k_weights [T, k] float32)` for every token."""
        selection = self.selection_scores(logits, scores)
        if self.n_group is not None:
            selection = self.limit_to_groups(selection)
        top_k_values, top_k_index = top_k_lower_index_first(selection, self.top_k)
        if self.topk_before_softmax:  # softmax over the k chosen logits only
            weights = logits.gather(1, top_k_index).softmax(dim=-1)
        else:
            # the chosen scores themselves when nothing was added to them for the selection
            weights = top_k_values if selection is scores else scores.gather(1, top_k_index)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True).add_(1e-20)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return top_k_index, weights

    def limit_to_groups(self, selection: torch.Tensor) -> torch.Tensor:
        """Keep the `topk_group` groups with the best group scores; the rest get -inf. A group's score is the sum
        of its two largest selection scores (`group_score="top2_sum"`, DeepSeek-V3) or its largest one (`"max"`,
        DeepSeek-V2); tied groups go to the lower group index, as tied experts do."""
        num_tokens = selection.shape[0]
        groups = selection.view(num_tokens, self.config.n_group, -1)
        if self.config.group_score == "max":
            group_scores = groups.amax(dim=-1)
        else:
            group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(dim=-1)
        kept = top_k_lower_index_first(group_scores, self.config.topk_group)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        return groups.masked_fill(~group_mask[..., None], float("-inf")).view(num_tokens, -1)

    def routing_probs(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-token distribution over experts for the aux loss and metrics."""
        if self.scoring_func == "sigmoid":
            return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        return scores

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        sequence_length: int | None = None,
    ) -> RouterOutput:
        """Route `[T, H]` tokens; `token_mask` `[T]` marks real (non-padding) tokens for the statistics,
        `sequence_length` splits the T tokens into sequences (sequence-level aux loss), `input_ids` `[T]`
        are the token ids (hash routing)."""
        logits = self.compute_logits(hidden_states)
        if self.fuses_softmax_top_k(logits):
            from ..kernels.softmax_top_k import softmax_top_k

            probs, top_k_index, weights = softmax_top_k(logits, self.top_k, self.norm_topk_prob)
            if self.routed_scaling_factor != 1.0:
                weights = weights * self.routed_scaling_factor
        else:
            scores = self.score(logits)
            top_k_index, weights = self.select(logits, scores, input_ids)
            probs = self.routing_probs(scores)
        return self.finish(logits, probs, top_k_index, weights, hidden_states.dtype, token_mask, sequence_length)

    def fuses_softmax_top_k(self, logits: torch.Tensor) -> bool:
        """Whether softmax → top-k → renormalise runs as one Triton kernel (`hf_moe.moe.kernels.softmax_top_k`):
        the plain softmax top-k of this class (no selection hook overridden, no expert bias, Gumbel noise, group
        limit or `topk_before_softmax`), many experts, float32 logits on CUDA; torch.compile traces it as the custom
        ops `hf_moe::softmax_top_k` and `hf_moe::softmax_top_k_backward`. Decided on the host from flags and types
        (docs/decisions/fused-router-top-k.md). Both paths route identically, so overriding this to force one
        (tests, benchmarks) changes only speed."""
        return (
            logits.is_cuda
            and logits.dtype == torch.float32
            and kernels.HAS_TRITON
            and self.fusable_softmax_top_k
            and not (self.training and self.config.router_gumbel_noise)
        )

    def finish(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        top_k_index: torch.Tensor,
        weights: torch.Tensor,
        dtype: torch.dtype,
        token_mask: torch.Tensor | None,
        sequence_length: int | None,
    ) -> RouterOutput:
        """Capacity dropping and the output: the parts every token-choice router shares. The counts, the aux loss
        (which sees the selection before dropping, as GShard / DeepSpeed) and the z-loss are left to
        [`RouterOutput`], which computes them when read; only the aux-loss-free bias counts the selection here,
        in training."""
        selection = top_k_index
        if self.training and self.expert_bias is not None:
            counts = expert_counts(selection, self.num_experts, token_mask)
            self.expert_load = counts if self.expert_load is None else self.expert_load + counts
        capacity = drop_fraction = None
        if self.drop_tokens:
            if token_mask is not None:  # padding never takes capacity from real tokens
                top_k_index = top_k_index.masked_fill(~token_mask[:, None], self.num_experts)
            capacity = expert_capacity(self.config, top_k_index.shape[0], self.training)
            requested = assigned_slots(top_k_index, self.num_experts).sum()
            top_k_index, weights = drop_over_capacity(
                top_k_index, weights, self.num_experts, capacity,
                random_priority=self.config.use_rts and self.training,
                renormalize=self.config.renormalize_after_drop,
            )
            kept = assigned_slots(top_k_index, self.num_experts).sum()
            drop_fraction = (requested - kept).float() / requested.clamp(min=1).float()
        return RouterOutput(
            logits=logits,
            top_k_index=top_k_index,
            top_k_weights=weights if weights.dtype == dtype else weights.to(dtype),
            probs=probs,
            token_mask=token_mask,
            capacity=capacity,
            drop_fraction=drop_fraction,
            statistics=SelectionStatistics(self, selection, sequence_length),
        )

    def aux_loss(
        self,
        probs: torch.Tensor,
        top_k_index: torch.Tensor,
        token_mask: torch.Tensor | None,
        sequence_length: int | None,
        counts: torch.Tensor,
    ) -> torch.Tensor:
        """This layer's load-balancing loss; `counts` `[E]` are the slots per expert of `top_k_index`."""
        kind = self.config.router_aux_loss_type
        if kind == "switch":
            return switch_loss(probs, counts, self.num_experts, token_mask, self.loss_reduction)
        if kind == "sequence":
            length = sequence_length or top_k_index.shape[0]
            return sequence_load_balancing_loss(probs, top_k_index, self.num_experts, length, token_mask)
        return probs.new_zeros(())


@dataclass
class SelectionStatistics:
    """A token-choice router's statistics, computed when its [`RouterOutput`] is read: the counts of the slots
    that reach an expert, and `router.aux_loss` of the `selection` `[T, k]` before capacity dropping."""

    router: HfMoeRouter
    selection: torch.Tensor
    sequence_length: int | None = None

    def tokens_per_expert(self, output: RouterOutput) -> torch.Tensor:
        return expert_counts(output.top_k_index, self.router.num_experts, output.token_mask)

    def aux_loss(self, output: RouterOutput) -> torch.Tensor:
        if self.selection is output.top_k_index:  # nothing dropped: the counts are the selection's
            counts = output.tokens_per_expert
        else:
            counts = expert_counts(self.selection, self.router.num_experts, output.token_mask)
        return self.router.aux_loss(output.probs, self.selection, output.token_mask, self.sequence_length, counts)

    def token_entropy(self, output: RouterOutput) -> None:
        """None: the routing-entropy metric takes it from `output.probs`."""
        return None


@register_router("switch")
class SwitchRouter(HfMoeRouter):
    """Switch Transformer top-1 router (`router_type="switch"`, `num_experts_per_tok=1`).

    The combine weight is the expert's probability (`norm_topk_prob=False`, as in the Switch Transformer) or a
    hard 1.0 (`norm_topk_prob=True`: the one selected weight renormalised). With `router_gumbel_noise` this is
    DeepSpeed's RSample top-1 gate.
    """
