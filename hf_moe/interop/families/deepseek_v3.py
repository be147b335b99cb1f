"""DeepSeek-V3 (`model_type="deepseek_v3"`): multi-head latent attention (`hf_moe.mla`: q/kv low-rank projections,
rope/nope split, interleaved RoPE, YaRN's softmax scale), the first `first_k_dense_replace` layers dense, then MoE
layers with sigmoid scores, a score correction bias (`e_score_correction_bias`) for selection only, group-limited
top-k (a group ranked by the sum of its two best scores), routed scaling and `n_shared_experts` ungated shared
experts. The attention's tensors keep DeepSeek's names in hf-moe, so only the router's are renamed.

Fields of DeepSeek's own config.json that transformers' class ignores are read for what they mean: `scoring_func`,
`topk_method` and `moe_layer_freq` must say what transformers' class computes (sigmoid, `noaux_tc`, every layer
after the dense ones); `ep_size`, `aux_loss_alpha` and `seq_aux` are training or serving settings. The
multi-token-prediction layers after the last layer (`num_nextn_predict_layers`) are not part of the causal LM:
transformers' class does not load them, and neither does hf-moe.
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
    dense_and_moe_layers,
    mla_fields,
    refuse,
    refuse_unread,
    require_dense_then_moe,
)

# DeepSeek's own config.json fields that transformers' class does not read: the value its code takes as given.
_ASSUMED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    refuse_unread("deepseek_v3", cfg, _ASSUMED)
    return {**common_to_hf_moe(cfg), **mla_fields(cfg), **deepseek_moe_to_hf_moe(cfg)}


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if not cfg.is_mla:
        raise refuse("deepseek_v3", "kv_lora_rank", None,
                     "DeepSeek-V3's attention is multi-head latent attention (grouped-query models export to mixtral, "
                     "qwen2_moe, qwen3_moe, olmoe or glm4_moe)")
    dense, moe = dense_and_moe_layers(cfg)
    require_dense_then_moe(cfg, "deepseek_v3",
                           "DeepSeek-V3's dense layers are the first first_k_dense_replace ones and every later layer "
                           "is MoE; no family with multi-head latent attention takes another pattern")
    if cfg.scoring_func != "sigmoid":
        raise refuse("deepseek_v3", "scoring_func", cfg.scoring_func,
                     "DeepSeek-V3 scores experts with a sigmoid (softmax routers export to mixtral, qwen2_moe, "
                     "qwen3_moe or olmoe)")
    if not cfg.use_expert_bias:
        raise refuse("deepseek_v3", "use_expert_bias", False,
                     "DeepSeek-V3 always selects with a score correction bias; set use_expert_bias=True (a zero bias "
                     "selects the same experts)")
    if moe and cfg.num_shared_experts == 0:
        raise refuse("deepseek_v3", "num_shared_experts", 0,
                     "DeepSeek-V3's MoE layers always have shared experts (qwen3_moe has none, but no multi-head "
                     "latent attention)")
    n_group = cfg.n_group or 1
    if cfg.num_experts // n_group < 2:
        raise refuse("deepseek_v3", "n_group", cfg.n_group,
                     "DeepSeek-V3 ranks a group by its two best experts, so every group needs at least two")
    return {**common_from_hf_moe(cfg), **mla_fields(cfg), **deepseek_moe_from_hf_moe(cfg, "deepseek_v3")}


DEEPSEEK_V3 = MoeFamily(
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | DEEPSEEK_MOE_HANDLED | set(MLA_FIELDS) | set(_ASSUMED) | {
        "qk_head_dim", "rope_interleave", "attention_bias", "pretraining_tp", "ep_size", "aux_loss_alpha", "seq_aux"},
    ignored=beyond_last_layer,
)
