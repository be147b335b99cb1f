"""Qwen2-MoE (`qwen2_moe`) and Qwen3-MoE (`qwen3_moe`): softmax top-k (renormalised or not), MoE layers chosen by
`decoder_sparse_step` and `mlp_only_layers`. Qwen2-MoE adds q/k/v biases and one shared expert scaled by a sigmoid
gate; Qwen3-MoE adds per-head q/k RMSNorm and has no shared expert.

Qwen2-MoE's sliding window applies to the layers from `max_window_layers` on when `use_sliding_window`: hf-moe
imports it when it covers every layer or none (`sliding_window=0` with `use_sliding_window=False` is no window).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    MoeFamily,
    common_from_hf_moe,
    common_to_hf_moe,
    dense_and_moe_layers,
    refuse,
)

_MOE_FIELDS = frozenset({"intermediate_size", "moe_intermediate_size", "num_experts", "norm_topk_prob",
                         "decoder_sparse_step", "mlp_only_layers", "sliding_window", "use_sliding_window",
                         "max_window_layers"})


def _moe_layers(cfg: PretrainedConfig) -> list[int]:
    step, dense = cfg.decoder_sparse_step, set(cfg.mlp_only_layers or [])
    return [i for i in range(cfg.num_hidden_layers) if i not in dense and cfg.num_experts > 0 and (i + 1) % step == 0]


def _sliding_window(family: str, cfg: PretrainedConfig) -> int | None:
    if not getattr(cfg, "use_sliding_window", False):
        return None
    types = list(getattr(cfg, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers)
    if "full_attention" in types:
        raise refuse(family, "max_window_layers", getattr(cfg, "max_window_layers", None),
                     f"with use_sliding_window=True the layers mix full and sliding attention ({types}); hf-moe "
                     "applies one sliding_window to every layer (max_window_layers=0) or to none")
    return cfg.sliding_window


def _common(family: str, cfg: PretrainedConfig) -> dict[str, Any]:
    return {
        **common_to_hf_moe(cfg),
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "moe_layers": _moe_layers(cfg),
        "sliding_window": _sliding_window(family, cfg),
    }


def _common_back(cfg: HfMoeConfig) -> dict[str, Any]:
    dense, _ = dense_and_moe_layers(cfg)
    window = cfg.sliding_window
    return {
        **common_from_hf_moe(cfg),
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense,
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": 0,
    }


def qwen2_to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    shared = cfg.shared_expert_intermediate_size
    if not shared:
        raise refuse("qwen2_moe", "shared_expert_intermediate_size", shared,
                     "a zero-width shared expert (Qwen3-MoE is the family without one)")
    return {**_common("qwen2_moe", cfg), "qkv_bias": getattr(cfg, "qkv_bias", True), "num_shared_experts": 1,
            "shared_expert_intermediate_size": shared, "shared_expert_gate": True}


def qwen2_from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if not cfg.shared_expert_size or not cfg.shared_expert_gate:
        raise refuse("qwen2_moe", "shared_expert_gate" if cfg.shared_expert_size else "num_shared_experts",
                     cfg.shared_expert_gate if cfg.shared_expert_size else cfg.num_shared_experts,
                     "Qwen2-MoE has exactly one shared expert scaled by a sigmoid gate (export a model without shared "
                     "experts to qwen3_moe or mixtral, ungated shared experts to glm4_moe)")
    return {**_common_back(cfg), "qkv_bias": cfg.qkv_bias or cfg.attention_bias,
            "shared_expert_intermediate_size": cfg.shared_expert_size}


def qwen3_to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    return {**_common("qwen3_moe", cfg), "attention_bias": cfg.attention_bias, "qk_norm": True}


def qwen3_from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    return {**_common_back(cfg), "attention_bias": cfg.attention_bias}


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
