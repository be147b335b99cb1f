"""GLM-4-MoE (`model_type="glm4_moe"`, GLM-4.5): the first `first_k_dense_replace` layers dense, then MoE layers
with sigmoid scores, an expert bias (`e_score_correction_bias`) for selection only, group-limited top-k, routed
scaling and `n_shared_experts` ungated shared experts; partial rotary (`partial_rotary_factor`), q/k/v biases
(`attention_bias`) and optional per-head q/k norm (`use_qk_norm`).

The multi-token-prediction layers a GLM-4.5 checkpoint carries after the last layer (`num_nextn_predict_layers`)
are not part of the causal LM: transformers' class does not load them, and neither does hf-moe.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    DEEPSEEK_MOE_HANDLED,
    MoeFamily,
    beyond_last_layer,
    common_from_hf_moe,
    common_to_hf_moe,
    deepseek_moe_from_hf_moe,
    deepseek_moe_to_hf_moe,
    refuse,
    require_dense_then_moe,
)


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    return {
        **common_to_hf_moe(cfg),
        **deepseek_moe_to_hf_moe(cfg),
        "qkv_bias": cfg.attention_bias,
        "qk_norm": cfg.use_qk_norm,
    }


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if cfg.scoring_func != "sigmoid":
        raise refuse("glm4_moe", "scoring_func", cfg.scoring_func,
                     "GLM-4-MoE routes with sigmoid scores (mixtral, qwen2_moe, qwen3_moe and olmoe take softmax)")
    require_dense_then_moe(cfg, "glm4_moe",
                           "GLM-4-MoE's dense layers are the first first_k_dense_replace ones and every later layer is"
                           " MoE (qwen2_moe and qwen3_moe take any pattern)")
    if not cfg.use_expert_bias:
        raise refuse("glm4_moe", "use_expert_bias", False,
                     "GLM-4-MoE always selects with an expert bias; set use_expert_bias=True (a zero bias selects "
                     "the same experts)")
    if cfg.attention_bias:
        raise refuse("glm4_moe", "attention_bias", True,
                     "GLM-4-MoE's o_proj has no bias (olmoe and qwen3_moe take attention_bias=True)")
    return {
        **common_from_hf_moe(cfg),
        **deepseek_moe_from_hf_moe(cfg, "glm4_moe"),
        "attention_bias": cfg.qkv_bias,
        "use_qk_norm": cfg.qk_norm,
    }


GLM4_MOE = MoeFamily(
    model_type="glm4_moe",
    architecture="Glm4MoeForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | DEEPSEEK_MOE_HANDLED | {"attention_bias", "use_qk_norm", "partial_rotary_factor"},
    ignored=beyond_last_layer,
)
