"""Qwen2-MoE (`qwen2_moe`) and Qwen3-MoE (`qwen3_moe`): softmax top-k (renormalised or not), MoE layers chosen by
`decoder_sparse_step` and `mlp_only_layers`. Qwen2-MoE adds q/k/v biases and one shared expert scaled by a sigmoid
gate; Qwen3-MoE adds per-head q/k RMSNorm and has no shared expert.

Qwen2-MoE's layers attend as the `layer_types` transformers' class resolves: unless given, with `use_sliding_window`
the even layers below `max_window_layers` slide (transformers 5's rule) and the others attend to everything; an export
writes them and the `max_window_layers` that gives them. Qwen3-MoE's window, with `use_sliding_window`, is every
layer's.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    MoeFamily,
    attention_layers_to_hf_moe,
    common_from_hf_moe,
    common_to_hf_moe,
    dense_and_moe_layers,
    refuse,
    sliding_layers,
)

_MOE_FIELDS = frozenset({"intermediate_size", "moe_intermediate_size", "num_experts", "norm_topk_prob",
                         "decoder_sparse_step", "mlp_only_layers", "sliding_window", "use_sliding_window",
                         "max_window_layers"})


def _moe_layers(cfg: PretrainedConfig) -> list[int]:
    step, dense = cfg.decoder_sparse_step, set(cfg.mlp_only_layers or [])
    return [i for i in range(cfg.num_hidden_layers) if i not in dense and cfg.num_experts > 0 and (i + 1) % step == 0]


def _common(cfg: PretrainedConfig) -> dict[str, Any]:
    return {
        **common_to_hf_moe(cfg),
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "moe_layers": _moe_layers(cfg),
    }


def _common_back(cfg: HfMoeConfig) -> dict[str, Any]:
    dense, _ = dense_and_moe_layers(cfg)
    return {
        **common_from_hf_moe(cfg),
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense,
    }


def qwen2_to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    shared = cfg.shared_expert_intermediate_size
    if not shared:
        raise refuse("qwen2_moe", "shared_expert_intermediate_size", shared,
                     "a zero-width shared expert (Qwen3-MoE is the family without one)")
    return {**_common(cfg), **attention_layers_to_hf_moe("qwen2_moe", cfg.layer_types, cfg.sliding_window),
            "qkv_bias": getattr(cfg, "qkv_bias", True), "num_shared_experts": 1,
            "shared_expert_intermediate_size": shared, "shared_expert_gate": True}


def qwen2_from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if not cfg.shared_expert_size or not cfg.shared_expert_gate:
        raise refuse("qwen2_moe", "shared_expert_gate" if cfg.shared_expert_size else "num_shared_experts",
                     cfg.shared_expert_gate if cfg.shared_expert_size else cfg.num_shared_experts,
                     "Qwen2-MoE has exactly one shared expert scaled by a sigmoid gate (export a model without shared "
                     "experts to qwen3_moe or mixtral, ungated shared experts to glm4_moe)")
    sliding = sliding_layers(cfg)
    window_layers = sliding[-1] + 1 if sliding else 0
    if sliding != list(range(0, window_layers, 2)):
        raise refuse("qwen2_moe", "layer_types", cfg.attention_layer_types,
                     "Qwen2-MoE's sliding layers are the even ones below max_window_layers (dots1's are the ones from "
                     "its max_window_layers on)")
    return {**_common_back(cfg), "qkv_bias": cfg.qkv_bias or cfg.attention_bias,
            "shared_expert_intermediate_size": cfg.shared_expert_size, "use_sliding_window": bool(sliding),
            "sliding_window": cfg.sliding_window if sliding else None, "max_window_layers": window_layers,
            "layer_types": cfg.attention_layer_types}


def qwen3_to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    return {**_common(cfg), "sliding_window": cfg.sliding_window, "attention_bias": cfg.attention_bias,
            "qk_norm": True}


def qwen3_from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    window = cfg.sliding_window
    return {**_common_back(cfg), "use_sliding_window": window is not None, "sliding_window": window,
            "max_window_layers": 0, "attention_bias": cfg.attention_bias}


QWEN2_MOE = MoeFamily(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    to_hf_moe=qwen2_to_hf_moe,
    from_hf_moe=qwen2_from_hf_moe,
    handled_fields=COMMON_HANDLED | _MOE_FIELDS | {"qkv_bias", "shared_expert_intermediate_size"},
    shared_experts="shared_expert",
)

QWEN3_MOE = MoeFamily(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    to_hf_moe=qwen3_to_hf_moe,
    from_hf_moe=qwen3_from_hf_moe,
    handled_fields=COMMON_HANDLED | _MOE_FIELDS | {"attention_bias", "num_local_experts"},
)
