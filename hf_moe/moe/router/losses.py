"""Load-balancing losses and the bias-balancing rule, for one MoE layer (docs/routing.md).

All of them follow the sentinel-slot contract of [`hf_moe.moe.types`]: a slot whose expert index is `num_experts`
counts for no expert. Single-process: a loss over the tokens of several ranks takes a `reduce` callable (a
differentiable sum over ranks) that `hf_moe.parallel` supplies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

Reduction = Callable[[torch.Tensor], torch.Tensor]
"""`reduce(t)`: the differentiable sum of `t` over the ranks that share a loss."""


def expert_counts(index: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
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
    reduce: Reduction | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/GShard load-balancing loss `E · Σᵢ fᵢ · Pᵢ` for one layer, and the per-expert slot counts.

    `fᵢ` is the number of (token, slot) pairs routed to expert i divided by the number of tokens, `Pᵢ` the
    mean router probability of expert i; padding tokens (`token_mask == False`) count in neither. Under
    perfect balance the loss equals k (the number of experts per token); divide by k for a value of 1.
    This equals transformers' `load_balancing_loss_func` applied to this layer alone. Sentinel slots
    (`num_experts`) count for no expert.

    With `reduce` (a differentiable sum over ranks), fᵢ and Pᵢ are taken over the tokens of every rank (the loss
    of the concatenated batch); under DDP this gives exactly the single-process gradient. The returned counts
    stay local.
    """
    counts = expert_counts(top_k_index, num_experts, token_mask)
    return switch_loss(probs, counts, num_experts, token_mask, reduce), counts


def switch_loss(
    probs: torch.Tensor,
    counts: torch.Tensor,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    reduce: Reduction | None = None,
) -> torch.Tensor:
    """[`load_balancing_loss`] from the `[E]` slot counts, as `E · (counts · prob_sum) / num_tokens²`."""
    if token_mask is None:
        # the token count is known on the host: no device scalar, no extra kernels (docs/decisions/router-host-ops.md)
        num_tokens = probs.shape[0]
        prob_sum = probs.sum(dim=0)
    else:
        mask = token_mask.to(probs.dtype)
        num_tokens = mask.sum()
        prob_sum = mask @ probs
    return switch_loss_from_sums(counts, prob_sum, num_tokens, num_experts, reduce)


def switch_loss_from_sums(
    counts: torch.Tensor,
    prob_sum: torch.Tensor,
    num_tokens: int | torch.Tensor,
    num_experts: int,
    reduce: Reduction | None = None,
) -> torch.Tensor:
    """[`switch_loss`] from the `[E]` slot counts, the `[E]` routing probabilities summed over the real tokens and
    their number (for routers that sum the probabilities without a `[T, E]` tensor: product keys)."""
    counts = counts.to(prob_sum.dtype)
    if reduce is not None:
        if not torch.is_tensor(num_tokens):
            # torch.full fills on the device: no host-to-device copy, so the layer stays CUDA-graph capturable
            num_tokens = torch.full((), num_tokens, dtype=prob_sum.dtype, device=prob_sum.device)
        counts = reduce(counts)
        num_tokens = reduce(num_tokens.detach())
        prob_sum = reduce(prob_sum)
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


def expert_bias_step(load: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): the change of `expert_bias` for the selection counts `load [E]`,
    `rate · sign(mean load − load)`: up by `rate` for an expert selected less than the mean, down if more, none at
    the mean. The bias shifts only which experts are selected, never the combine weights."""
    return rate * torch.sign(load.mean() - load)


def router_loss_weight(
    labels: torch.Tensor, shift_labels: torch.Tensor | None, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor | float:
    """Weight of this micro-batch's router losses when the LM loss is normalised by `num_items_in_batch`.

    With `num_items_in_batch` (the Trainer's and accelerate's gradient-accumulation recipe), the LM loss of a
    micro-batch is `sum / N` where N counts the target tokens of every micro-batch of the optimizer step on every
    process; the Trainer then neither divides by the accumulation steps nor averages over processes (it multiplies
    by the world size to undo DDP's mean). A router loss added unscaled would therefore be counted once per micro-batch
    and per process (huggingface/transformers#48690). Weighting it by this micro-batch's share `n / N` of the target
    tokens makes the router losses of one optimizer step a token-weighted mean with the configured coefficient.
    """
    if num_items_in_batch is None:
        return 1.0
    targets = shift_labels if shift_labels is not None else labels[..., 1:]
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(targets.device)
    return targets.ne(-100).sum() / num_items_in_batch


def check_router_loss_gradient(
    router_loss: torch.Tensor, loss: torch.Tensor, blocks: Callable[[], Iterable[nn.Module]]
) -> None:
    """Refuse a router loss without a gradient while the model trains and a router of its MoE `blocks()` has
    trainable parameters (the blocks are looked up only then: a healthy step pays no walk over the modules).
    Reentrant gradient checkpointing causes it: it runs each layer without gradient and recomputes it in backward,
    where the router outputs the layer reported are not collected again, so the load-balancing and z losses would
    add to the loss's value and train nothing."""
    if not loss.requires_grad or router_loss.requires_grad:
        return
    if any(p.requires_grad for block in blocks() for p in block.router.parameters()):
        raise ValueError(
            "the router losses have no gradient while the routers train: most likely the model runs with reentrant "
            "gradient checkpointing (use_reentrant=True), which recomputes each layer in backward without its router "
            "outputs. Enable it with gradient_checkpointing_kwargs={'use_reentrant': False}, or set "
            "router_aux_loss_coef and router_z_loss_coef to 0.")
