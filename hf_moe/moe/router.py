"""Routers: token → expert choice, and the auxiliary losses that keep experts balanced.

Every router returns one small [`RouterOutput`], so routing strategies and expert-parallel dispatch can change
without the MoE block or the model changing. Routers are looked up by `config.router_type` in one registry;
add your own with [`register_router`]:

```python
@hf_moe.register_router("my_router")
class MyRouter(hf_moe.HfMoeRouter):
    def select(self, logits, scores, input_ids=None):  # -> (top_k_index [T, k], top_k_weights [T, k])
        ...
```

Slots a router leaves unassigned (capacity dropping, expert choice) carry the sentinel expert index
`num_experts` and weight 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..configuration_hf_moe import HfMoeConfig
from .capacity import drop_over_capacity, expert_capacity
from .kernels import HAS_TRITON as _HAS_TRITON


class _ComputedOnRead:
    """Default of a [`RouterOutput`] field that is computed from the other fields on first read and then kept, so a
    forward pays nothing (no kernel launch, no host time) for a statistic nobody reads. A value given to the
    constructor or assigned later is kept as it is; `None` means "compute on read".

    The value is computed with gradient tracking on, as the forward would have: a first read under `no_grad` (a
    metrics hook) must not hand a detached value to the loss that reads it next."""

    def __init__(self, compute: Callable[[RouterOutput], torch.Tensor]) -> None:
        self.compute = compute

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, output: RouterOutput | None, owner: type | None = None) -> torch.Tensor | None:
        if output is None:  # class access: the dataclass field's default
            return None
        value = output.__dict__.get(self.name)
        if value is None:
            with torch.enable_grad():
                value = output.__dict__[self.name] = self.compute(output)
        return value

    def __set__(self, output: RouterOutput, value: torch.Tensor | None) -> None:
        output.__dict__[self.name] = value


@dataclass
class RouterOutput:
    """What one MoE layer's router decided for a flat batch of T tokens.

    Attributes:
        logits: `[T, E]` float32 (float64 in a float64 model) router logits; zeros for routers without a
            learned gate (hash, fake_balanced).
        top_k_index: `[T, k]` chosen experts; `num_experts` marks a dropped / unassigned slot
            (for expert choice k = E: column e is e where expert e took the token).
        top_k_weights: `[T, k]` combine weights (dtype of the hidden states), 0 on sentinel slots.
        tokens_per_expert: `[E]` (token, slot) pairs each expert processes, padding and dropped slots excluded.
        aux_loss: load-balancing loss of this layer (see [`load_balancing_loss`]).
        z_loss: router z-loss of this layer (see [`router_z_loss`]); when not given, computed from `logits` and
            `token_mask` on first read.
        probs: `[T, E]` float32 routing distribution (softmax, or sigmoid scores normalised per token) used by
            the aux loss and the routing-entropy metric.
        token_mask: `[T]` real (non-padding) tokens, or None when every token is real.
        capacity: slots per expert when capacity applies (dropping, expert choice), else None.
        drop_fraction: 0-dim float32: token choice: dropped real slots / real slots; expert choice: real tokens
            no expert took / real tokens. When not given (nothing can drop), 0 on first read.
    """

    logits: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor | None = _ComputedOnRead(lambda output: router_z_loss(output.logits, output.token_mask))
    probs: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    capacity: int | None = None
    drop_fraction: torch.Tensor | None = _ComputedOnRead(lambda output: output.logits.new_zeros(()))


def _expert_counts(index: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """`[E]` float32 count of the real (token, slot) pairs per expert; sentinel slots are ignored.

    Padding slots are sent to the sentinel bin, which is cut off. No host sync (unlike `torch.bincount` on CUDA);
    sums of 1.0 are exact in any order."""
    if token_mask is not None:
        index = torch.where(token_mask[:, None], index, num_experts)
    index = index.reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.float32, device=index.device)
    ones = torch.ones(index.shape, dtype=torch.float32, device=index.device)
    return counts.scatter_add_(0, index, ones)[:num_experts]


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
    This equals transformers' `load_balancing_loss_func` applied to this layer alone. Sentinel slots
    (`num_experts`) count for no expert.

    With a process `group`, fᵢ and Pᵢ are taken over the tokens of every rank in it (the loss of the concatenated
    batch), through a differentiable all-reduce; under DDP this gives exactly the single-process gradient.
    The returned counts stay local.
    """
    counts = _expert_counts(top_k_index, num_experts, token_mask)
    return _switch_loss(probs, counts, num_experts, token_mask, group), counts


def _switch_loss(
    probs: torch.Tensor, counts: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None, group
) -> torch.Tensor:
    """[`load_balancing_loss`] from the `[E]` slot counts, as `E · (counts · prob_sum) / num_tokens²`."""
    counts = counts.to(probs.dtype)
    if token_mask is None:
        num_tokens = probs.shape[0]  # known on the host: no device scalar, no extra kernels
        prob_sum = probs.sum(dim=0)
    else:
        mask = token_mask.to(probs.dtype)
        num_tokens = mask.sum()
        prob_sum = mask @ probs
    if group is not None:
        from ..parallel.collectives import all_reduce_sum

        if not torch.is_tensor(num_tokens):
            # torch.full fills on the device: no host-to-device copy, so the layer stays CUDA-graph capturable
            num_tokens = torch.full((), num_tokens, dtype=probs.dtype, device=probs.device)
        counts = all_reduce_sum(counts, group)
        num_tokens = all_reduce_sum(num_tokens.detach(), group)
        prob_sum = all_reduce_sum(prob_sum, group)
    if torch.is_tensor(num_tokens):
        return num_experts * torch.dot(counts, prob_sum) / num_tokens.clamp(min=1.0).square()
    return torch.dot(counts, prob_sum) * (num_experts / max(num_tokens, 1) ** 2)


def sequence_load_balancing_loss(
    probs: torch.Tensor,
    top_k_index: torch.Tensor,
    num_experts: int,
    sequence_length: int,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sequence-level balance loss (DeepSeek-V2/V3): `E · Σᵢ fᵢ · Pᵢ` computed inside each sequence, then
    averaged over the sequences that hold at least one real token.

    Like the switch loss it equals k under perfect balance within every sequence; DeepSeek's normalisation
    (`fᵢ` scaled by E/k) is this value divided by k. With one sequence it equals [`load_balancing_loss`].
    """
    num_tokens = top_k_index.shape[0]
    batch = num_tokens // sequence_length
    mask = torch.ones(num_tokens, device=probs.device) if token_mask is None else token_mask.to(torch.float32)
    mask = mask.view(batch, sequence_length)
    one_hot = torch.zeros(num_tokens, top_k_index.shape[1], num_experts + 1, device=probs.device)
    one_hot.scatter_(2, top_k_index[..., None], 1.0)
    counts = one_hot[..., :num_experts].sum(1).view(batch, sequence_length, num_experts)
    real = mask.sum(1)
    denom = real.clamp(min=1.0)[:, None]
    f = (counts * mask[..., None]).sum(1) / denom
    p = (probs.view(batch, sequence_length, num_experts) * mask[..., None]).sum(1) / denom
    per_sequence = num_experts * (f * p).sum(-1)
    has_tokens = (real > 0).to(per_sequence.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss `mean(logsumexp(logits)²)` over real tokens (ST-MoE); keeps router logits small."""
    z = torch.logsumexp(logits, dim=-1).square()
    if token_mask is None:
        return z.mean()
    mask = token_mask.to(z.dtype)
    return (z * mask).sum() / mask.sum().clamp(min=1.0)


_HALF_DTYPES = (torch.bfloat16, torch.float16)
_FULL_DTYPES = (torch.float32, torch.float64)
# Experts from which the router fuses softmax → top-k: torch.topk is two thirds of the router's GPU time at 128
# experts, and on an H200 the fused kernel makes the router 3-4 % and the Qwen3-30B-A3B block 1.5-3.5 % faster
# (T = 8192, eager training); at Mixtral's 8 experts it is 2 % slower (benchmarks/router_fused.py, NOTES.md).
_FUSED_TOP_K_MIN_EXPERTS = 32
# Router hooks a subclass may override; a router that overrides none of them routes as `HfMoeRouter` does.
_SELECTION_HOOKS = ("score", "selection_scores", "select", "routing_probs")


class _Float32AccumulatedLinear(torch.autograd.Function):
    """`x [T, H] @ weight [E, H]ᵀ` of half-precision operands → float32 `[T, E]`; gradients in the operands'
    dtypes. Saves only the half operands (no float32 copy of x lives until backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        if x.is_cuda:  # cuBLAS: half operands, float32 accumulation and float32 output
            return torch.mm(x, weight.t(), out_dtype=torch.float32)
        return torch.mm(x.float(), weight.float().t())  # no such kernel elsewhere: same values through float32

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad_logits.to(x.dtype)  # as a half-precision linear layer followed by `.float()` would do
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def _half_operands_float32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits `x·Wᵀ` in float32 from bf16/fp16 `x [..., H]` and `weight [E, H]`: the float32 GEMM's result
    (up to summation order) at the cost of a half-precision GEMM; `x.grad` comes back in x's dtype."""
    logits = _Float32AccumulatedLinear.apply(x.reshape(-1, x.shape[-1]), weight)
    return logits.view(*x.shape[:-1], weight.shape[0])


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k)` over the last dim, with exactly tied scores going to the lower expert index on every device.

    Upcycling with granularity G gives the G experts of a virtual group identical router rows, so their scores are
    bitwise equal, and two groups can tie as well: top-k must then take whole groups, which the lower-index rule
    does (the fused kernel follows it too). CUDA's radix-select top-k takes tied values in index order; the CPU's
    does not (it picked experts 3 and 5 of the scores `[a, a, b, b, b, b]`, b > a), so there a stable sort decides.
    """
    if scores.is_cuda:
        return scores.topk(k, dim=-1)
    values, index = scores.sort(dim=-1, descending=True, stable=True)
    return values[..., :k].contiguous(), index[..., :k].contiguous()  # laid out as topk's results


ROUTER_CLASSES: dict[str, type[nn.Module]] = {}
"""`config.router_type` → router class. Fill it with [`register_router`]."""


def register_router(name: str):
    """Class decorator: make a router selectable with `HfMoeConfig(router_type=name)`.

    The class is built as `cls(config, layer_idx)` and its `forward(hidden_states [T, H], token_mask [T] | None,
    *, input_ids [T] | None, sequence_length: int)` returns a [`RouterOutput`]. Subclassing [`HfMoeRouter`] and
    overriding `select` is the short way. Register before building or loading a config that names it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_router(name={name!r}): expected a non-empty string.")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in ROUTER_CLASSES and ROUTER_CLASSES[name] is not cls:
            raise ValueError(f"register_router: router_type {name!r} is already taken by {ROUTER_CLASSES[name]}.")
        ROUTER_CLASSES[name] = cls
        return cls

    return decorator


def build_router(config: HfMoeConfig, layer_idx: int | None = None) -> nn.Module:
    """The router `config.router_type` names, for MoE layer `layer_idx`."""
    return ROUTER_CLASSES[config.router_type](config, layer_idx)


@register_router("topk")
class HfMoeRouter(nn.Module):
    """Token-choice top-k router (`router_type="topk"`), and the base class of the other routers.

    `logits = x·Wᵣᵀ` in float32 → scores (softmax, or sigmoid) → selection → combine weights:

    - softmax, top-k of the probabilities, weights renormalised to sum to 1 when `norm_topk_prob`
      (Mixtral/Qwen); `topk_before_softmax` picks the k largest logits and softmaxes those k instead;
    - sigmoid scores, weights renormalised when `norm_topk_prob` (DeepSeek-V3);
    - `n_group`/`topk_group`: only experts of the `topk_group` groups with the largest top-2 score sums;
    - weights times `routed_scaling_factor`.

    Selection (never the weights) adds `expert_bias` (aux-loss-free balancing) and, in training, Gumbel noise;
    jitter multiplies the router input in training. With `drop_tokens`, slots beyond each expert's capacity
    become sentinels.
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
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size)) if self.learned else None
        if config.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.aux_loss_group = None  # a process group: load-balancing loss over all its ranks' tokens
        self.expert_load: torch.Tensor | None = None
        """Selections per expert since the last `update_expert_bias` (training only; not a buffer, so DDP's
        buffer broadcast leaves each rank's own counts alone)."""

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
        return F.linear(x, self.weight.to(x.dtype))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.config.scoring_func == "sigmoid" else logits.softmax(dim=-1)

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
        if self.config.n_group is not None:
            selection = self.limit_to_groups(selection)
        top_k_values, top_k_index = _top_k(selection, self.top_k)
        if self.config.topk_before_softmax:  # softmax over the k chosen logits only
            weights = logits.gather(1, top_k_index).softmax(dim=-1)
        else:
            # the chosen scores themselves when nothing was added to them for the selection
            weights = top_k_values if selection is scores else scores.gather(1, top_k_index)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.config.routed_scaling_factor != 1.0:
            weights = weights * self.config.routed_scaling_factor
        return top_k_index, weights

    def limit_to_groups(self, selection: torch.Tensor) -> torch.Tensor:
        """Keep the `topk_group` groups with the largest sum of their top-2 scores; the rest get -inf."""
        num_tokens = selection.shape[0]
        groups = selection.view(num_tokens, self.config.n_group, -1)
        group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(dim=-1)
        kept = group_scores.topk(self.config.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        return groups.masked_fill(~group_mask[..., None], float("-inf")).view(num_tokens, -1)

    def routing_probs(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-token distribution over experts for the aux loss and metrics."""
        if self.config.scoring_func == "sigmoid":
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
        if self._fuses_softmax_top_k(logits):
            from .kernels.softmax_top_k import softmax_top_k

            probs, top_k_index, weights = softmax_top_k(logits, self.top_k, self.norm_topk_prob)
            if self.config.routed_scaling_factor != 1.0:
                weights = weights * self.config.routed_scaling_factor
        else:
            scores = self.score(logits)
            top_k_index, weights = self.select(logits, scores, input_ids)
            probs = self.routing_probs(scores)
        return self.finish(logits, probs, top_k_index, weights, hidden_states.dtype, token_mask, sequence_length)

    def _fuses_softmax_top_k(self, logits: torch.Tensor) -> bool:
        """Whether softmax → top-k → renormalise runs as one Triton kernel (`hf_moe.moe.kernels.softmax_top_k`):
        the plain softmax top-k of this class (no selection hook overridden, no expert bias, Gumbel noise, group
        limit or `topk_before_softmax`), many experts, float32 logits on CUDA, and not while torch.compile traces
        (it fuses the torch ops itself). Decided on the host from flags and types."""
        config = self.config
        return (
            logits.is_cuda
            and logits.dtype == torch.float32
            and _HAS_TRITON
            and config.scoring_func == "softmax"
            and self.expert_bias is None
            and not (self.training and config.router_gumbel_noise)
            and config.n_group is None
            and not config.topk_before_softmax
            and _FUSED_TOP_K_MIN_EXPERTS <= self.num_experts <= 1024
            and self.top_k <= self.num_experts
            and all(getattr(type(self), hook) is getattr(HfMoeRouter, hook) for hook in _SELECTION_HOOKS)
            and not torch.compiler.is_compiling()
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
        """Losses and counts from the selection, then capacity dropping: the parts every token-choice router
        shares. The aux loss sees the selection before dropping (as GShard / DeepSpeed). The z-loss is left to
        [`RouterOutput`], which computes it when read."""
        counts = _expert_counts(top_k_index, self.num_experts, token_mask)  # before dropping
        aux_loss = self.aux_loss(probs, top_k_index, token_mask, sequence_length, counts)
        if self.training and self.expert_bias is not None:
            self.expert_load = counts.clone() if self.expert_load is None else self.expert_load + counts
        capacity = drop_fraction = None
        if self.config.drop_tokens:
            if token_mask is not None:  # padding never takes capacity from real tokens
                top_k_index = top_k_index.masked_fill(~token_mask[:, None], self.num_experts)
            capacity = expert_capacity(self.config, top_k_index.shape[0], self.training)
            requested = (top_k_index < self.num_experts).sum()
            top_k_index, weights = drop_over_capacity(
                top_k_index, weights, self.num_experts, capacity,
                random_priority=self.config.use_rts and self.training,
            )
            kept = (top_k_index < self.num_experts).sum()
            drop_fraction = (requested - kept).float() / requested.clamp(min=1).float()
            counts = _expert_counts(top_k_index, self.num_experts, token_mask)  # what is left after dropping
        return RouterOutput(
            logits=logits,
            top_k_index=top_k_index,
            top_k_weights=weights.to(dtype),
            tokens_per_expert=counts,
            aux_loss=aux_loss,
            probs=probs,
            token_mask=token_mask,
            capacity=capacity,
            drop_fraction=drop_fraction,
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
            return _switch_loss(probs, counts, self.num_experts, token_mask, self.aux_loss_group)
        if kind == "sequence":
            length = sequence_length or top_k_index.shape[0]
            return sequence_load_balancing_loss(probs, top_k_index, self.num_experts, length, token_mask)
        return probs.new_zeros(())


@register_router("switch")
class SwitchRouter(HfMoeRouter):
    """Switch Transformer top-1 router (`router_type="switch"`, `num_experts_per_tok=1`).

    The combine weight is the expert's probability (`norm_topk_prob=False`, as in the Switch Transformer) or a
    hard 1.0 (`norm_topk_prob=True`: the one selected weight renormalised). With `router_gumbel_noise` this is
    DeepSpeed's RSample top-1 gate.
    """


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
        untouched = ((top_k_index < self.num_experts).sum(1) == 0).float() * real
        return RouterOutput(
            logits=logits,
            top_k_index=top_k_index,
            top_k_weights=weights.to(hidden_states.dtype),
            tokens_per_expert=_expert_counts(top_k_index, self.num_experts, token_mask),
            aux_loss=logits.new_zeros(()),
            probs=self.routing_probs(scores),
            token_mask=token_mask,
            capacity=capacity,
            drop_fraction=untouched.sum() / real.sum().clamp(min=1.0),
        )


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
        output.z_loss = output.aux_loss
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
