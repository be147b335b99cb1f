"""Hunyuan-MoE-V1 (`model_type="hunyuan_v1_moe"`, Hunyuan-A13B): Llama's grouped-query attention with per-head
q/k RMSNorm after RoPE (`qk_norm_order="after_rope"`), every layer MoE: softmax scores over all experts, top-k
renormalised, plus one ungated shared MLP (`shared_mlp`) `intermediate_size` wide, the width of every routed expert
too. The router is `gate.wg`.

Tencent's config.json may give fields per layer, as lists: `moe_topk` and `num_experts` are imported when every layer
has the same value (hf-moe's MoE layers share one). It also carries fields transformers' class does not read: those
about the decoder (`_ASSUMED`) are accepted only when they say what the class computes anyway, other values are
refused; those about parts that are not the causal LM (vision tower, multimodal token ids, classification head, the
cross-layer attention factor that only `use_cla` would use; `_IGNORED`) are ignored.

RoPE `"dynamic"` with an NTK `alpha` (Hunyuan-A13B's release) is, in transformers 5.23, plain RoPE over a stretched
base `rope_theta · alpha^(d/(d-2))` (`d` = head_dim) at every position, which is what hf-moe imports. transformers
5.17 computes the same up to `max_position_embeddings`; past it, it recomputes the frequencies as dynamic NTK scaling
of `rope_theta` by `factor`, dropping `alpha`, until a call no longer than `max_position_embeddings` resets them.
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
            "mlp_bias", "moe_layer_num_skipped", "attention_head_dim", "org_vocab_size", "norm_type", "norm_topk_prob",
            "routed_scaling_factor", "group_limited_greedy", "moe_drop_tokens", "moe_random_routing_dropped_token",
            "use_rotary_pos_emb", "position_embedding_xdrope", "add_classification_head")
_IGNORED = frozenset({
    "anyres_pooling_size", "anyres_vit_max_image_size", "anyres_vit_two_views", "vit_add_patchemb_bias",
    "vit_input_resolution", "vit_mapping_type", "vit_norm_type", "vit_patch", "vit_path", "vit_remove_prenorm",
    "vit_token", "vit_type", "vit_used_rms_norm", "num_media_embeds", "image_token_id", "im_start_id", "im_end_id",
    "im_newline_id", "mask_init_id", "text_start_id", "text_end_id", "video_start_id", "video_end_id", "pad_id",
    "xdrope_section", "class_num", "pool_type", "skip_cls_token", "dense_list", "cla_share_factor"})


def _head_dim(cfg: PretrainedConfig) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _assumed(cfg: PretrainedConfig) -> dict[str, Any]:
    """Tencent's config.json fields that transformers' class does not read, with the value its code computes."""
    values = (True, True, 1, cfg.intermediate_size, False, False, False, 0, _head_dim(cfg), cfg.vocab_size, "rms", True,
              1.0, False, False, False, True, False, False)
    return dict(zip(_ASSUMED, values, strict=True))


def _ntk_alpha_rope(rope: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """transformers 5.23's fixed NTK-alpha RoPE (`"dynamic"` with an `alpha`) as plain RoPE over the stretched base;
    the other keys of `rope` (`factor`, YaRN's betas and mscales) are not read by it."""
    if rope.get("rope_type") != "dynamic" or not rope["alpha"]:
        raise refuse("hunyuan_v1_moe", "rope_parameters['alpha']", rope["alpha"],
                     f"transformers' HunYuanMoEV1 reads alpha only with rope_type 'dynamic' (got "
                     f"{rope.get('rope_type')!r}), where Tencent's code may read it otherwise")
    return {"rope_type": "default", "rope_theta": rope["rope_theta"] * rope["alpha"] ** (head_dim / (head_dim - 2))}


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    for field_name, value in _assumed(cfg).items():
        given = getattr(cfg, field_name, value)
        if _uniform(field_name, given) != value:
            raise refuse("hunyuan_v1_moe", field_name, given,
                         f"transformers' HunYuanMoEV1 computes {field_name}={value!r} whatever config.json says, so "
                         "the checkpoint's own code and transformers' disagree")
    fields = common_to_hf_moe(cfg)
    if "alpha" in fields["rope_parameters"]:
        fields["rope_parameters"] = _ntk_alpha_rope(fields["rope_parameters"], fields["head_dim"])
    return {
        **fields,
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
    handled_fields=COMMON_HANDLED | set(_ASSUMED) | _IGNORED | {
        "intermediate_size", "num_experts", "moe_topk", "attention_bias", "pretraining_tp", "eod_token_id",
        "sep_token_id"},
    router="gate.wg.weight",
    shared_experts="shared_mlp",
    renames=((r"\.self_attn\.q_norm\.", ".self_attn.query_layernorm."),
             (r"\.self_attn\.k_norm\.", ".self_attn.key_layernorm.")),
)
