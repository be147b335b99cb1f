"""What `upcycling-quality` measures on a model: held-out loss, expert load, parameter counts, and the loss curve."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=blocks.device)
    for chunk in blocks.split(batch_size):
        logits = model(input_ids=chunk, use_cache=False).logits[:, :-1]
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
    model.train()
    return total.item() / (blocks.shape[0] * (blocks.shape[1] - 1))


@torch.no_grad()
def expert_load(model: torch.nn.Module, blocks: torch.Tensor) -> list[float]:
    """Per MoE layer: the busiest expert's share of routed tokens × the number of experts (1 = balanced)."""
    model.eval()
    outputs = model(input_ids=blocks, use_cache=False, output_router_logits=True).router_outputs
    model.train()
    loads = []
    for r in outputs:
        counts = r.tokens_per_expert.float()
        loads.append(round((counts.max() / counts.sum() * counts.numel()).item(), 3))
    return loads


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token): routed expert weights count k/E of their size as active."""
    total = active = 0
    config = model.config
    fraction = config.num_experts_per_tok / config.num_experts if hasattr(config, "num_experts") else 1.0
    for name, p in model.named_parameters():
        total += p.numel()
        active += p.numel() * (fraction if ".mlp.experts." in name else 1.0)
    return total, round(active)


@dataclass
class Curve:
    points: list = field(default_factory=list)  # [tokens seen, held-out loss, mean train loss since last point]
