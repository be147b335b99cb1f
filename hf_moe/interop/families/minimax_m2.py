"""MiniMax-M2 (`model_type="minimax_m2"`): Mixtral's block in every layer with sigmoid scores, an expert bias for
selection only (`e_score_correction_bias`, a buffer on the MoE block rather than on its router), the top-k weights
renormalised and no shared experts; RMSNorm over the whole q and k projections (`qk_norm_scope="projection"`) and
partial rotary (`rotary_dim` of each head's dimensions).

MiniMax's own config.json fields that transformers' class does not read are read for what they mean: sigmoid scores
with a routing bias, q/k norm over the layer's projection, no shared expert, no routed scaling, no sliding window and
full attention in every layer (`attn_type_list`). Its multi-token-prediction modules (`use_mtp`, `num_mtp_modules`,
`mtp_transformer_layers`) are not part of the causal LM: transformers' class builds none, and hf-moe loads none
(layers after the last one are ignored, as for DeepSeek-V3 and GLM-4.5). `rotary_dim` must agree with the rotary
width transformers' class uses (`rope_parameters["partial_rotary_factor"]`, which recent versions derive from it and
older ones leave at 1).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    ExpertNames,
    MoeFamily,
    beyond_last_layer,
    common_from_hf_moe,
    common_to_hf_moe,
    dense_and_moe_layers,
    refuse,
    refuse_unread,
)

# MiniMax's config.json fields that transformers' class does not read: the value its code takes as given.
_ASSUMED = {"scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True, "qk_norm_type": "per_layer",
            "shared_intermediate_size": 0, "routed_scaling_factor": 1.0, "sliding_window": None}
# MiniMax's multi-token-prediction modules: they size modules outside the causal LM, whatever their values.
_MTP_FIELDS = ("use_mtp", "num_mtp_modules", "mtp_transformer_layers")


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    if getattr(cfg, "router_jitter_noise", 0.0):
        raise refuse("minimax_m2", "router_jitter_noise", cfg.router_jitter_noise,
                     "MiniMax-M2 multiplies the whole MoE input (experts included) by the training noise, hf-moe only "
                     "the router's input; set it to 0.0 in config.json to import the checkpoint")
    refuse_unread("minimax_m2", cfg, _ASSUMED)
    attention_types = getattr(cfg, "attn_type_list", None)
    if attention_types is not None and set(attention_types) != {1}:
        raise refuse("minimax_m2", "attn_type_list", attention_types,
                     "transformers' MiniMax-M2 uses full softmax attention (type 1) in every layer; linear-attention "
                     "layers (type 0, MiniMax-01) have no hf-moe counterpart")
    fields = common_to_hf_moe(cfg)
    rotated = int(fields["head_dim"] * fields["rope_parameters"].get("partial_rotary_factor", 1.0))
    if getattr(cfg, "rotary_dim", None) not in (None, rotated):
        raise refuse("minimax_m2", "rotary_dim", cfg.rotary_dim,
                     f"transformers' MiniMax-M2 rotates {rotated} dimensions of each head (rope_parameters="
                     f"{fields['rope_parameters']}; versions before rotary_dim was read leave it at head_dim), so the "
                     "checkpoint's own code and transformers' disagree; set rope_parameters['partial_rotary_factor'] "
                     "= rotary_dim / head_dim")
    return {
        **fields,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.intermediate_size,
        "num_experts": cfg.num_local_experts,
        "scoring_func": "sigmoid",
        "use_expert_bias": True,
        "norm_topk_prob": True,
        "qk_norm": True,
        "qk_norm_scope": "projection",
    }


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    dense, moe = dense_and_moe_layers(cfg)
    projection_norm = cfg.qk_norm and cfg.qk_norm_scope == "projection"
    for field_name, value, ok, why in (
        ("scoring_func", cfg.scoring_func, cfg.scoring_func == "sigmoid", "MiniMax-M2 scores experts with a sigmoid "
         "(softmax routers export to mixtral, qwen2_moe, qwen3_moe or olmoe)"),
        ("use_expert_bias", False, cfg.use_expert_bias, "MiniMax-M2 always selects with an expert bias; set "
         "use_expert_bias=True (a zero bias selects the same experts)"),
        ("norm_topk_prob", False, cfg.norm_topk_prob, "MiniMax-M2 always renormalises the top-k weights (glm4_moe "
         "and dots1 take either)"),
        ("routed_scaling_factor", cfg.routed_scaling_factor, cfg.routed_scaling_factor == 1.0, "MiniMax-M2 does not "
         "scale the routed experts (glm4_moe, deepseek_v3, dots1, solar_open and glm4_moe_lite do)"),
        ("num_shared_experts", cfg.num_shared_experts, not cfg.shared_expert_size, "MiniMax-M2 has no shared experts "
         "(glm4_moe, deepseek_v3, dots1, solar_open and glm4_moe_lite take ungated ones, qwen2_moe one gated)"),
        ("moe_layers", moe, not dense, "every MiniMax-M2 layer is MoE (glm4_moe, dots1 and qwen3_moe take dense "
         "layers)"),
        ("qk_norm_scope" if cfg.qk_norm else "qk_norm", cfg.qk_norm_scope if cfg.qk_norm else False, projection_norm,
         "MiniMax-M2 always normalises the whole q and k projections (qwen3_moe, glm4_moe and dots1 normalise per "
         "head)"),
        ("attention_bias", True, not (cfg.attention_bias or cfg.qkv_bias), "MiniMax-M2's attention has no biases "
         "(olmoe, qwen3_moe and dots1 take them)"),
    ):
        if not ok:
            raise refuse("minimax_m2", field_name, value, why)
    return {
        **common_from_hf_moe(cfg),
        "intermediate_size": cfg.moe_intermediate_size,
        "num_local_experts": cfg.num_experts,
        "rotary_dim": cfg.rotary_dim,  # what MiniMax's own code and serving engines read
        "router_jitter_noise": 0.0,
    }


MINIMAX_M2 = MoeFamily(
    model_type="minimax_m2",
    architecture="MiniMaxM2ForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | set(_ASSUMED) | {"intermediate_size", "num_local_experts", "router_jitter_noise",
                                                     "rotary_dim", "attn_type_list", *_MTP_FIELDS},
    moe_module="block_sparse_moe",
    expert_bias="e_score_correction_bias",
    expert_names=ExpertNames(gate="w1", up="w3", down="w2"),
    ignored=beyond_last_layer,
)
