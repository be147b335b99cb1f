"""Hunyuan-MoE-V1 (`model_type="hunyuan_v1_moe"`, Hunyuan-A13B): Llama's grouped-query attention with per-head
q/k RMSNorm after RoPE (`qk_norm_order="after_rope"`), every layer MoE: softmax scores over all experts, top-k
renormalised, plus one ungated shared MLP (`shared_mlp`) `intermediate_size` wide, the width of every routed expert
too. The router is `gate.wg`.

Tencent's config.json may give fields per layer, as lists: `moe_topk` and `num_experts` are imported when every layer
has the same value (hf-moe's MoE layers share one). It also carries fields transformers' class does not read:
`use_qk_norm`, `use_mixed_mlp_moe`, `num_shared_expert`, `moe_intermediate_size`, `use_cla`, `use_mla`, `mlp_bias` and
`moe_layer_num_skipped` are accepted only when they say what the class computes anyway; other values are refused.
RoPE with a fixed NTK `alpha` (`rope_parameters["alpha"]`, which transformers 5.17 and 5.23 compute differently
beyond `max_position_embeddings`) is refused.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import COMMON_HANDLED, MoeFamily, common_from_hf_moe, common_to_hf_moe, dense_and_moe_layers, refuse


def _uniform(field_name: str, value: Any) -> Any:
    """The one value of a field that config.json may give per layer (a list)."""
    if not isinstance(value, (list, tuple)):
        return value
    if len(set(value)) != 1:
        raise refuse("hunyuan_v1_moe", field_name, value,
                     "its per-layer values differ, and hf-moe's MoE layers share one value")
    return value[0]


_ASSUMED = ("use_qk_norm", "use_mixed_mlp_moe", "num_shared_expert", "moe_intermediate_size", "use_cla", "use_mla",
            "mlp_bias", "moe_layer_num_skipped")


def _assumed(cfg: PretrainedConfig) -> dict[str, Any]:
    """Tencent's config.json fields that transformers' class does not read, with the value its code computes."""
    return dict(zip(_ASSUMED, (True, True, 1, cfg.intermediate_size, False, False, False, 0), strict=True))


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    for field_name, value in _assumed(cfg).items():
        given = getattr(cfg, field_name, value)
        if _uniform(field_name, given) != value:
            raise refuse("hunyuan_v1_moe", field_name, given,
                         f"transformers' HunYuanMoEV1 computes {field_name}={value!r} whatever config.json says, so "
                         "the checkpoint's own code and transformers' disagree")
    if "alpha" in (cfg.rope_parameters or {}):
        raise refuse("hunyuan_v1_moe", "rope_parameters['alpha']", cfg.rope_parameters["alpha"],
                     "hf-moe has no NTK-alpha RoPE (transformers' versions differ on it past max_position_embeddings)")
    return {
        **common_to_hf_moe(cfg),
        "num_experts_per_tok": _uniform("moe_topk", cfg.moe_topk),
        "num_experts": _uniform("num_experts", cfg.num_experts),
        "attention_bias": cfg.attention_bias,
        "qk_norm": True,
        "qk_norm_order": "after_rope",
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.intermediate_size,
        "num_shared_experts": 1,
        "shared_expert_intermediate_size": cfg.intermediate_size,
        "scoring_func": "softmax",
        "norm_topk_prob": True,
    }


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if cfg.is_mla:
        raise refuse("hunyuan_v1_moe", "kv_lora_rank", cfg.kv_lora_rank,
                     "Hunyuan-MoE's attention is grouped-query attention (deepseek_v2 and deepseek_v3 take multi-head "
                     "latent attention)")
    if not cfg.qk_norm or cfg.qk_norm_order != "after_rope":
        field_name, value = ("qk_norm", False) if not cfg.qk_norm else ("qk_norm_order", cfg.qk_norm_order)
        raise refuse("hunyuan_v1_moe", field_name, value,
                     "Hunyuan-MoE normalises each head's queries and keys after RoPE (qwen3_moe and glm4_moe "
                     "normalise them before)")
    dense, _ = dense_and_moe_layers(cfg)
    if dense:
        raise refuse("hunyuan_v1_moe", "moe_layers", cfg.moe_layer_indices,
                     "every Hunyuan-MoE layer is MoE (qwen2_moe and qwen3_moe take dense layers)")
    if cfg.qkv_bias and not cfg.attention_bias:
        raise refuse("hunyuan_v1_moe", "qkv_bias", True,
                     "Hunyuan-MoE's attention_bias puts a bias on o_proj too (qwen2_moe takes q/k/v biases only)")
    if cfg.scoring_func != "softmax" or cfg.use_expert_bias:
        field_name, value = (("scoring_func", cfg.scoring_func) if cfg.scoring_func != "softmax"
                             else ("use_expert_bias", True))
        raise refuse("hunyuan_v1_moe", field_name, value,
                     "Hunyuan-MoE selects by plain softmax scores (glm4_moe and deepseek_v3 take sigmoid scores with "
                     "an expert bias)")
    width = cfg.intermediate_size
    if cfg.moe_intermediate_size != width or cfg.shared_expert_size != width or cfg.shared_expert_gate:
        field_name, value = next((name, v) for name, v, ok in (
            ("moe_intermediate_size", cfg.moe_intermediate_size, cfg.moe_intermediate_size == width),
            ("shared_expert_intermediate_size", cfg.shared_expert_size, cfg.shared_expert_size == width),
            ("shared_expert_gate", True, False)) if not ok)
        raise refuse("hunyuan_v1_moe", field_name, value,
                     f"Hunyuan-MoE's routed experts and its one ungated shared MLP are all intermediate_size={width} "
                     "wide")
    fields = common_from_hf_moe(cfg)
    fields["moe_topk"] = fields.pop("num_experts_per_tok")  # Hunyuan's name
    return {**fields, "num_experts": cfg.num_experts, "attention_bias": cfg.attention_bias, "intermediate_size": width}


HUNYUAN_V1_MOE = MoeFamily(
    model_type="hunyuan_v1_moe",
    architecture="HunYuanMoEV1ForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | set(_ASSUMED) | {
        "intermediate_size", "num_experts", "moe_topk", "attention_bias", "pretraining_tp", "eod_token_id",
        "sep_token_id"},
    router="gate.wg.weight",
    shared_experts="shared_mlp",
    renames=((r"\.self_attn\.q_norm\.", ".self_attn.query_layernorm."),
             (r"\.self_attn\.k_norm\.", ".self_attn.key_layernorm.")),
)
