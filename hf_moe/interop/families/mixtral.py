"""Mixtral (`model_type="mixtral"`): every layer MoE, softmax top-k renormalised, no shared experts, no biases.

Mixtral's router takes the softmax over all experts, keeps the k largest and renormalises them, which is the softmax
over the k largest logits (`topk_before_softmax`); hf-moe imports it as `norm_topk_prob=True`, the same operations
in the same order.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import COMMON_HANDLED, ExpertNames, MoeFamily, common_from_hf_moe, common_to_hf_moe, refuse


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    if getattr(cfg, "router_jitter_noise", 0.0):
        raise refuse("mixtral", "router_jitter_noise", cfg.router_jitter_noise,
                     "Mixtral multiplies the whole MoE input (experts included) by the training noise, hf-moe only "
                     "the router's input; set it to 0.0 in config.json to import the checkpoint")
    return {
        **common_to_hf_moe(cfg),
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.intermediate_size,
        "num_experts": cfg.num_local_experts,
        "norm_topk_prob": True,
        "sliding_window": getattr(cfg, "sliding_window", None),
    }


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    return {
        **common_from_hf_moe(cfg),
        "intermediate_size": cfg.moe_intermediate_size,
        "num_local_experts": cfg.num_experts,
        "sliding_window": cfg.sliding_window,
        "router_jitter_noise": 0.0,
    }


MIXTRAL = MoeFamily(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | {"intermediate_size", "num_local_experts", "sliding_window",
                                     "router_jitter_noise"},
    moe_module="block_sparse_moe",
    expert_names=ExpertNames(gate="w1", up="w3", down="w2"),
)
