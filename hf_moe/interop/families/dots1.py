"""dots.llm1 (`model_type="dots1"`): Qwen3's attention (per-head q/k RMSNorm, `attention_bias` on q/k/v and o, a
sliding window on the layers from `max_window_layers` on) with DeepSeek-V3's MoE: the first `first_k_dense_replace`
layers dense, then MoE layers with sigmoid scores, an expert bias (`e_score_correction_bias`) for selection only,
group-limited top-k, routed scaling and `n_shared_experts` ungated shared experts.

Its rotary embedding rotates every dimension of a head (a `partial_rotary_factor` is refused). The layers' attention
types are the `layer_types` transformers' class resolves (from `max_window_layers` unless given); an export writes
them and the `max_window_layers` that gives them, so it takes models whose sliding layers are the last ones. The
released checkpoints' config.json also names `scoring_func`, which transformers' class does not read (it always scores
with a sigmoid): any other value is refused.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    DEEPSEEK_MOE_HANDLED,
    MoeFamily,
    attention_layers_to_hf_moe,
    common_from_hf_moe,
    common_to_hf_moe,
    deepseek_moe_from_hf_moe,
    deepseek_moe_to_hf_moe,
    refuse,
    refuse_unread,
    require_deepseek_routing,
    require_dense_then_moe,
    require_rotary_factor,
    sliding_layers,
)

_FULL_ROTARY = "Dots1's attention rotates every dimension of a head"
# rednote's own config.json fields that transformers' class does not read: the value its code takes as given.
_ASSUMED = {"scoring_func": "sigmoid"}


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    refuse_unread("dots1", cfg, _ASSUMED)
    fields = common_to_hf_moe(cfg)
    require_rotary_factor("dots1", fields["rope_parameters"], _FULL_ROTARY)
    return {
        **fields,
        **deepseek_moe_to_hf_moe(cfg),
        "attention_bias": cfg.attention_bias,
        "qk_norm": True,
        **attention_layers_to_hf_moe("dots1", cfg.layer_types, cfg.sliding_window),
    }


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    require_deepseek_routing(cfg, "dots1")
    require_dense_then_moe(cfg, "dots1",
                           "Dots1's dense layers are the first first_k_dense_replace ones and every later layer is MoE"
                           " (glm4_moe_lite takes any pattern)")
    if not cfg.qk_norm or cfg.qk_norm_scope != "head":
        raise refuse("dots1", "qk_norm_scope" if cfg.qk_norm else "qk_norm",
                     cfg.qk_norm_scope if cfg.qk_norm else False,
                     "Dots1 always normalises q and k per head (glm4_moe's q/k norm is optional, olmoe and "
                     "minimax_m2 normalise the whole projection)")
    if cfg.qkv_bias and not cfg.attention_bias:
        raise refuse("dots1", "qkv_bias", True,
                     "Dots1's attention_bias puts a bias on o_proj too (glm4_moe and solar_open take q/k/v biases "
                     "alone)")
    require_rotary_factor("dots1", cfg.rope_parameters, _FULL_ROTARY)
    sliding = sliding_layers(cfg)
    first_sliding = cfg.num_hidden_layers - len(sliding)
    if sliding != list(range(first_sliding, cfg.num_hidden_layers)):
        raise refuse("dots1", "layer_types", cfg.attention_layer_types,
                     "Dots1's sliding layers are the ones from max_window_layers on (qwen2_moe's are the even ones "
                     "below its max_window_layers)")
    moe_fields = deepseek_moe_from_hf_moe(cfg, "dots1")
    moe_fields.pop("num_nextn_predict_layers")  # Dots1 has no multi-token-prediction layers
    return {
        **common_from_hf_moe(cfg),
        **moe_fields,
        "attention_bias": cfg.attention_bias,
        "sliding_window": cfg.sliding_window if sliding else None,
        "max_window_layers": first_sliding,
        "layer_types": cfg.attention_layer_types,
    }


DOTS1 = MoeFamily(
    model_type="dots1",
    architecture="Dots1ForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | DEEPSEEK_MOE_HANDLED | set(_ASSUMED) | {"attention_bias", "sliding_window",
                                                                         "max_window_layers"},
)
