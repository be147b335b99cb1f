"""Solar Open (`model_type="solar_open"`): Llama's attention (`attention_bias` on q/k/v only, no o_proj bias, every
dimension of a head rotated) with GLM-4-MoE's MoE in every layer: sigmoid scores, an expert bias
(`e_score_correction_bias`) for selection only, group-limited top-k, routed scaling and `n_shared_experts` ungated
shared experts.

Its config class drops GLM-4-MoE's `first_k_dense_replace`, `use_qk_norm` and dense `intermediate_size`; a
config.json that still carries them is read for what it means: transformers' class makes every layer MoE without q/k
norm, so other values are refused, and `intermediate_size` sizes nothing.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    DEEPSEEK_MOE_HANDLED,
    MoeFamily,
    common_from_hf_moe,
    common_to_hf_moe,
    deepseek_moe_from_hf_moe,
    deepseek_moe_to_hf_moe,
    dense_and_moe_layers,
    refuse,
    refuse_unread,
    require_deepseek_routing,
    require_rotary_factor,
)

_FULL_ROTARY = "SolarOpen's attention rotates every dimension of a head (its class fails on a partial factor)"
# GLM-4-MoE's fields that transformers' SolarOpen class does not read: the value its code takes as given.
_ASSUMED = {"first_k_dense_replace": 0, "use_qk_norm": False}


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    refuse_unread("solar_open", cfg, _ASSUMED)
    fields = common_to_hf_moe(cfg)
    require_rotary_factor("solar_open", fields["rope_parameters"], _FULL_ROTARY)
    return {**fields, **deepseek_moe_to_hf_moe(cfg), "qkv_bias": cfg.attention_bias}


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    dense, moe = dense_and_moe_layers(cfg)
    require_deepseek_routing(cfg, "solar_open")
    if dense:
        raise refuse("solar_open", "moe_layers", moe,
                     "every SolarOpen layer is MoE (glm4_moe, deepseek_v3 and dots1 take dense first layers, "
                     "glm4_moe_lite any pattern)")
    if cfg.attention_bias:
        raise refuse("solar_open", "attention_bias", True,
                     "SolarOpen's o_proj has no bias (dots1, olmoe and qwen3_moe take attention_bias=True)")
    require_rotary_factor("solar_open", cfg.rope_parameters, _FULL_ROTARY)
    moe_fields = deepseek_moe_from_hf_moe(cfg, "solar_open")
    for absent in ("intermediate_size", "first_k_dense_replace", "num_nextn_predict_layers"):
        moe_fields.pop(absent)  # fields SolarOpen's config class does not have
    return {**common_from_hf_moe(cfg), **moe_fields, "attention_bias": cfg.qkv_bias}


SOLAR_OPEN = MoeFamily(
    model_type="solar_open",
    architecture="SolarOpenForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | DEEPSEEK_MOE_HANDLED | set(_ASSUMED) | {"attention_bias", "partial_rotary_factor"},
)
