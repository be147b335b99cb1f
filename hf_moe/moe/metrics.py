"""Router metrics: how evenly one MoE layer spreads its tokens.

[`compute_router_metrics`] stays on the device (no host sync), so the model can return it on every step;
[`router_metrics`] turns a model output (or router outputs) into plain Python numbers for logging.
`hf_moe.integrations.MoETrainerCallback` accumulates the same definitions ([`routing_entropy`],
[`max_over_mean_load`], [`experts_used_fraction`]) over its logging interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .types import RouterOutput

METRIC_NAMES = (
    "tokens_per_expert",
    "drop_fraction",
    "routing_entropy",
    "experts_used_fraction",
    "max_over_mean_load",
)


def routing_entropy(routing: RouterOutput) -> torch.Tensor:
    """0-dim: mean over real tokens of the entropy (nats) of the routing distribution: `routing.token_entropy`
    when the router gives it, else from `routing.probs` (the softmax of the logits when a router gives none);
    `log E` is uniform, 0 is one-hot."""
    if routing.token_entropy is not None:
        entropy = routing.token_entropy
    else:
        probs = routing.probs if routing.probs is not None else routing.logits.softmax(dim=-1)
        entropy = -(probs * probs.clamp(min=1e-30).log()).sum(dim=-1)
    if routing.token_mask is None:
        return entropy.mean()
    mask = routing.token_mask.to(entropy.dtype)
    return (entropy * mask).sum() / mask.sum().clamp(min=1.0)


def max_over_mean_load(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """0-dim float32: the busiest expert's load over the mean load (1 = perfect balance, 0 when nothing routed)."""
    counts = tokens_per_expert.float()
    return counts.max() / counts.mean().clamp(min=1e-30)


def experts_used_fraction(tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """0-dim float32: the share of experts that got at least one slot."""
    return (tokens_per_expert > 0).float().mean()


def compute_router_metrics(routing: RouterOutput) -> dict[str, torch.Tensor]:
    """One layer's metrics as device tensors:

    - `tokens_per_expert` `[E]`: (token, slot) pairs each expert processed (padding and drops excluded);
    - `drop_fraction`: dropped share of the requested slots (expert choice: tokens no expert took);
    - `routing_entropy`: mean over real tokens of the entropy (nats) of the routing distribution; `log E` is
      uniform, 0 is one-hot;
    - `experts_used_fraction`: share of experts that got at least one slot;
    - `max_over_mean_load`: busiest expert's load over the mean load (1 = perfect balance).
    """
    counts = routing.tokens_per_expert.float()
    drop = routing.drop_fraction if routing.drop_fraction is not None else counts.new_zeros(())
    return {
        "tokens_per_expert": counts.detach(),
        "drop_fraction": drop.detach().float(),
        "routing_entropy": routing_entropy(routing).detach(),
        "experts_used_fraction": experts_used_fraction(counts),
        "max_over_mean_load": max_over_mean_load(counts).detach(),
    }


def router_metrics(outputs: Any, to_python: bool = True) -> list[dict[str, Any]]:
    """Per-MoE-layer router metrics (see [`compute_router_metrics`] for their meaning), in layer order.

    `outputs` is a model output carrying `router_metrics` (forward with `output_router_metrics=True`) or
    `router_outputs` (`output_router_logits=True`), a sequence of [`RouterOutput`], or one [`RouterOutput`].
    With `to_python` (default) values are floats and `tokens_per_expert` a list of floats, fetched from the
    device in one transfer; otherwise they stay device tensors.
    """
    if isinstance(outputs, RouterOutput):
        layers = [compute_router_metrics(outputs)]
    elif getattr(outputs, "router_metrics", None) is not None:
        layers = list(outputs.router_metrics)
    elif getattr(outputs, "router_outputs", None) is not None:
        layers = [compute_router_metrics(r) for r in outputs.router_outputs]
    elif isinstance(outputs, Sequence) and all(isinstance(r, RouterOutput) for r in outputs):
        layers = [compute_router_metrics(r) for r in outputs]
    else:
        raise ValueError(
            f"router_metrics: got {type(outputs).__name__} without router metrics; call the model with "
            "output_router_metrics=True (or output_router_logits=True), or pass RouterOutput objects."
        )
    if not to_python or not layers:
        return layers
    scalars = [name for name in METRIC_NAMES if name != "tokens_per_expert"]
    flat = torch.cat([torch.cat([m["tokens_per_expert"].float().reshape(-1),
                                 torch.stack([m[n].float().reshape(()) for n in scalars])]) for m in layers])
    values = flat.cpu().tolist()
    result, start = [], 0
    for m in layers:
        num_experts = m["tokens_per_expert"].numel()
        layer = {"tokens_per_expert": values[start:start + num_experts]}
        layer.update(zip(scalars, values[start + num_experts:start + num_experts + len(scalars)]))
        result.append(layer)
        start += num_experts + len(scalars)
    return result
