"""The outputs of the hf-moe models: transformers' MoE outputs plus each MoE layer's routing and the router metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .moe.types import RouterOutput


@dataclass
class HfMoeModelOutputWithPast(MoeModelOutputWithPast):
    """Base-model output plus each MoE layer's [`RouterOutput`] (`router_outputs`, one per MoE layer)."""

    router_outputs: tuple[RouterOutput, ...] | None = None


@dataclass
class HfMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """Causal-LM output. `aux_loss` is the load-balancing loss and `z_loss` the router z-loss, each averaged
    over MoE layers and unscaled, reported when labels are given or `output_router_logits`; `loss` includes
    `router_aux_loss_coef·aux_loss + router_z_loss_coef·z_loss` when labels are given. `router_metrics` (with
    `output_router_metrics=True`) holds one dict of 0-dim / [E] tensors per MoE layer, still on the device (see
    `hf_moe.router_metrics`)."""

    z_loss: torch.FloatTensor | None = None
    router_outputs: tuple[RouterOutput, ...] | None = None
    router_metrics: tuple[dict[str, torch.Tensor], ...] | None = None
