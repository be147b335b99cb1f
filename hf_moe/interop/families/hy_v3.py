"""Hy3 (`model_type="hy_v3"`, Tencent's Hy3 and Hy3-preview): Llama's grouped-query attention with per-head q/k
RMSNorm before RoPE (Qwen3's), the MLP of each layer dense or MoE as `mlp_layer_types` says; an MoE layer scores the
experts with a sigmoid, selects with an expert bias (a buffer on the block, `expert_bias`), renormalises the k chosen
scores and multiplies them by `router_scaling_factor`, and adds `num_shared_experts` ungated shared experts
(`shared_mlp`, `num_shared_experts · moe_intermediate_size` wide). The router is `router.gate`.

Tencent's config.json also carries fields transformers' class does not read (`_ASSUMED`): they must say what the class
computes. `first_k_dense_replace` must agree with `mlp_layer_types`, which the class reads (its default, one dense
layer, is what Hy3's `first_k_dense_replace=1` says). Precision and kernel switches (`enable_moe_fp32_combine`,
`enable_attention_fp32_softmax`, `enable_lm_head_fp32`, `use_grouped_mm`) do not change the function: the fp32 combine
adds two tensors of the model's dtype, which torch already rounds once. The multi-token-prediction layer after the
last one (`num_nextn_predict_layers`) is not part of the causal LM and is not loaded.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    MoeFamily,
    beyond_last_layer,
    common_from_hf_moe,
    common_to_hf_moe,
    dense_and_moe_layers,
    mlp_layer_types,
    moe_layers_from_types,
    refuse,
    refuse_unread,
    require_shared_width,
)

# Tencent's config.json fields that transformers' class does not read: the value its code takes as given.
_ASSUMED = {"moe_router_use_sigmoid": True, "moe_router_enable_expert_bias": True, "route_norm": True,
            "qk_norm": True}
# Precision, kernel, tokenizer and multi-token-prediction settings: no part of the causal LM's function.
_IGNORED = frozenset({"enable_moe_fp32_combine", "enable_attention_fp32_softmax", "enable_lm_head_fp32",
                      "use_grouped_mm", "eod_token_id", "sep_token_id", "num_nextn_predict_layers"})


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    refuse_unread("hy_v3", cfg, {**_ASSUMED, "expert_hidden_dim": cfg.moe_intermediate_size})
    moe = moe_layers_from_types("hy_v3", cfg, "HYV3")
    if cfg.mlp_bias:
        raise refuse("hy_v3", "mlp_bias", True, "hf-moe's dense and shared-expert MLPs have no biases")
    if not cfg.num_shared_experts:
        raise refuse("hy_v3", "num_shared_experts", cfg.num_shared_experts,
                     "transformers' HYV3 then builds one shared MLP intermediate_size wide, Tencent's code none")
    return {
        **common_to_hf_moe(cfg),
        "attention_bias": cfg.attention_bias,
        "qk_norm": True,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "moe_layers": moe,
        "num_shared_experts": cfg.num_shared_experts,
        "scoring_func": "sigmoid",
        "use_expert_bias": True,
        "norm_topk_prob": True,
        "routed_scaling_factor": cfg.router_scaling_factor,
        "router_aux_loss_type": "none",
    }


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if cfg.is_mla:
        raise refuse("hy_v3", "kv_lora_rank", cfg.kv_lora_rank,
                     "Hy3's attention is grouped-query attention (deepseek_v3 and glm4_moe_lite take multi-head latent "
                     "attention)")
    if not cfg.qk_norm or cfg.qk_norm_scope != "head" or cfg.qk_norm_order != "before_rope":
        field_name, value = next((name, getattr(cfg, name)) for name, ok in (
            ("qk_norm", cfg.qk_norm), ("qk_norm_scope", cfg.qk_norm_scope == "head"),
            ("qk_norm_order", cfg.qk_norm_order == "before_rope")) if not ok)
        raise refuse("hy_v3", field_name, value,
                     "Hy3 normalises each head's queries and keys before RoPE (olmoe and minimax_m2 normalise the "
                     "projections, hunyuan_v1_moe after RoPE)")
    if cfg.qkv_bias and not cfg.attention_bias:
        raise refuse("hy_v3", "qkv_bias", True,
                     "Hy3's attention_bias puts a bias on o_proj too (qwen2_moe takes q/k/v biases only)")
    if cfg.scoring_func != "sigmoid" or not cfg.use_expert_bias or not cfg.norm_topk_prob:
        field_name, value = next((name, getattr(cfg, name)) for name, ok in (
            ("scoring_func", cfg.scoring_func == "sigmoid"), ("use_expert_bias", cfg.use_expert_bias),
            ("norm_topk_prob", cfg.norm_topk_prob)) if not ok)
        raise refuse("hy_v3", field_name, value,
                     "Hy3 selects by sigmoid scores plus an expert bias and renormalises the chosen scores (set "
                     "use_expert_bias=True for a model without one: a zero bias selects the same experts)")
    if cfg.n_group is not None and cfg.topk_group < cfg.n_group:
        raise refuse("hy_v3", "n_group", cfg.n_group,
                     "Hy3 selects among all experts (glm4_moe and deepseek_v3 take group-limited routing)")
    _, moe = dense_and_moe_layers(cfg)
    if moe and (cfg.num_shared_experts == 0 or cfg.shared_expert_gate):
        field_name, value = (("num_shared_experts", 0) if cfg.num_shared_experts == 0
                             else ("shared_expert_gate", True))
        raise refuse("hy_v3", field_name, value,
                     "Hy3's MoE layers always add ungated shared experts (minimax_m2 has none, qwen2_moe a gated one)")
    require_shared_width(cfg, "hy_v3", "Hy3's shared experts are num_shared_experts·moe_intermediate_size wide")
    return {
        **common_from_hf_moe(cfg),
        "attention_bias": cfg.attention_bias,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "num_shared_experts": cfg.num_shared_experts,
        "router_scaling_factor": cfg.routed_scaling_factor,
        "mlp_layer_types": mlp_layer_types(cfg),
    }


HY_V3 = MoeFamily(
    model_type="hy_v3",
    architecture="HYV3ForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | set(_ASSUMED) | _IGNORED | {
        "attention_bias", "mlp_bias", "intermediate_size", "moe_intermediate_size", "expert_hidden_dim",
        "num_experts", "num_shared_experts", "router_scaling_factor", "mlp_layer_types", "first_k_dense_replace"},
    router="router.gate.weight",
    expert_bias="expert_bias",
    shared_experts="shared_mlp",
    ignored=beyond_last_layer,
)
