"""GLM-4-MoE-Lite (`model_type="glm4_moe_lite"`, GLM-4.7-Flash): DeepSeek-V3's multi-head latent attention
(`hf_moe.mla`) with GLM-4-MoE's MoE, the MoE layers named one by one (`mlp_layer_types`, `"sparse"` or `"dense"`):
sigmoid scores, an expert bias (`e_score_correction_bias`) for selection only, group-limited top-k, routed scaling
and `n_shared_experts` ungated shared experts. The attention's tensors keep DeepSeek's names in hf-moe.

Its config class has no `first_k_dense_replace`; a config.json that carries one beside `mlp_layer_types` must agree
with it, and DeepSeek's `scoring_func` and `topk_method` must say what transformers' class computes; a top-level
`partial_rotary_factor` (transformers versions that keep it beside `rope_parameters`) must be 1. The
multi-token-prediction layers after the last layer (`num_nextn_predict_layers`) are not part of the causal LM and are
not loaded.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    DEEPSEEK_MOE_HANDLED,
    MLA_FIELDS,
    MoeFamily,
    beyond_last_layer,
    common_from_hf_moe,
    common_to_hf_moe,
    deepseek_moe_from_hf_moe,
    deepseek_moe_to_hf_moe,
    mla_fields,
    mlp_layer_types,
    moe_layers_from_types,
    refuse,
    refuse_unread,
    require_deepseek_routing,
    require_rotary_factor,
)

_FULL_ROTARY = "Glm4MoeLite rotates all qk_rope_head_dim dimensions of a head (its class fails on a partial factor)"
# DeepSeek's config.json fields that transformers' class does not read: the value its code takes as given.
_ASSUMED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    refuse_unread("glm4_moe_lite", cfg, _ASSUMED)
    moe = moe_layers_from_types("glm4_moe_lite", cfg, "Glm4MoeLite")
    fields = common_to_hf_moe(cfg)
    require_rotary_factor("glm4_moe_lite", fields["rope_parameters"], _FULL_ROTARY)
    return {**fields, **mla_fields(cfg), **deepseek_moe_to_hf_moe(cfg), "first_k_dense": 0, "moe_layers": moe}


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if not cfg.is_mla:
        raise refuse("glm4_moe_lite", "kv_lora_rank", None,
                     "Glm4MoeLite's attention is multi-head latent attention (grouped-query models export to mixtral, "
                     "qwen2_moe, qwen3_moe, olmoe, glm4_moe, dots1, solar_open or minimax_m2)")
    require_deepseek_routing(cfg, "glm4_moe_lite")
    require_rotary_factor("glm4_moe_lite", cfg.rope_parameters, _FULL_ROTARY)
    fields = common_from_hf_moe(cfg)
    fields.pop("head_dim")  # Glm4MoeLite's head_dim is qk_rope_head_dim
    moe_fields = deepseek_moe_from_hf_moe(cfg, "glm4_moe_lite")
    for absent in ("first_k_dense_replace", "num_nextn_predict_layers"):
        moe_fields.pop(absent)  # fields Glm4MoeLite's config class does not have
    return {
        **fields,
        **mla_fields(cfg),
        **moe_fields,
        "mlp_layer_types": mlp_layer_types(cfg),
    }


GLM4_MOE_LITE = MoeFamily(
    model_type="glm4_moe_lite",
    architecture="Glm4MoeLiteForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | DEEPSEEK_MOE_HANDLED | set(MLA_FIELDS) | set(_ASSUMED) | {
        "qk_head_dim", "rope_interleave", "attention_bias", "pretraining_tp", "mlp_layer_types",
        "partial_rotary_factor"},
    ignored=beyond_last_layer,
)
