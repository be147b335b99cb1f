"""DeepSeek-V2 (`model_type="deepseek_v2"`, DeepSeek-V2 and V2-Lite): DeepSeek-V3's multi-head latent attention
(`hf_moe.mla`) with RoPE always on adjacent pairs (transformers rotates them as complex numbers, which is the same
rotation), the first `first_k_dense_replace` layers dense, then MoE layers with softmax scores over all experts, the k
best taken as they are (never renormalised) times `routed_scaling_factor`, and `n_shared_experts` ungated shared
experts. `topk_method="greedy"` picks the k best of all experts; `"group_limited_greedy"` only among the
`topk_group` groups whose best expert scores highest (`group_score="max"`). Tensors keep DeepSeek's names in hf-moe,
so only the router is renamed.

Fields of DeepSeek's own config.json that transformers' class ignores are read for what they mean: `scoring_func`
and `moe_layer_freq` must say what transformers' class computes (softmax, every layer after the dense ones), and
`norm_topk_prob` must be false: DeepSeek's own code renormalises then skips the routed scaling, transformers' class
never renormalises, so a checkpoint with it set computes different functions in the two. `ep_size`,
`aux_loss_alpha` and `seq_aux` are training or serving settings.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    MLA_FIELDS,
    MoeFamily,
    common_from_hf_moe,
    common_to_hf_moe,
    dense_and_moe_layers,
    refuse,
    require_dense_then_moe,
    require_shared_width,
)

TOPK_METHODS = ("greedy", "group_limited_greedy")
# DeepSeek's own config.json fields that transformers' class does not read: the value its code takes as given.
_ASSUMED = {"scoring_func": "softmax", "moe_layer_freq": 1}
_MOE_FIELDS = frozenset({"intermediate_size", "moe_intermediate_size", "n_routed_experts", "first_k_dense_replace",
                         "n_shared_experts", "n_group", "topk_group", "topk_method", "routed_scaling_factor",
                         "norm_topk_prob"})


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    for field_name, value in _ASSUMED.items():
        if getattr(cfg, field_name, value) != value:
            raise refuse("deepseek_v2", field_name, getattr(cfg, field_name),
                         f"transformers' DeepseekV2 computes {field_name}={value!r} whatever config.json says, so "
                         "the checkpoint's own code and transformers' disagree")
    if cfg.norm_topk_prob:
        raise refuse("deepseek_v2", "norm_topk_prob", cfg.norm_topk_prob,
                     "transformers' DeepseekV2 never renormalises the k weights while DeepSeek's own code does (and "
                     "then skips routed_scaling_factor), so the two disagree")
    if cfg.topk_method not in TOPK_METHODS:
        raise refuse("deepseek_v2", "topk_method", cfg.topk_method,
                     f"transformers' DeepseekV2 implements {' and '.join(TOPK_METHODS)} only (DeepSeek-V3's "
                     "'noaux_tc' is the deepseek_v3 family)")
    if cfg.mlp_bias:
        raise refuse("deepseek_v2", "mlp_bias", True, "hf-moe's dense and shared-expert MLPs have no biases")
    if not cfg.n_shared_experts:
        raise refuse("deepseek_v2", "n_shared_experts", cfg.n_shared_experts,
                     "transformers' DeepseekV2 then builds zero-width shared experts; hf-moe has none")
    grouped = cfg.topk_method == "group_limited_greedy"  # greedy ignores n_group and topk_group
    return {
        **common_to_hf_moe(cfg),
        **{name: getattr(cfg, name) for name in MLA_FIELDS},
        "rope_interleave": True,
        "attention_bias": cfg.attention_bias,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.n_routed_experts,
        "first_k_dense": cfg.first_k_dense_replace,
        "num_shared_experts": cfg.n_shared_experts,
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "n_group": cfg.n_group if grouped else None,
        "topk_group": cfg.topk_group if grouped else None,
        "group_score": "max" if grouped else "top2_sum",
        "router_aux_loss_type": "none",
    }


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if not cfg.is_mla:
        raise refuse("deepseek_v2", "kv_lora_rank", None,
                     "DeepSeek-V2's attention is multi-head latent attention (grouped-query models export to mixtral, "
                     "qwen2_moe, qwen3_moe, olmoe or glm4_moe)")
    if not cfg.rope_interleave:
        raise refuse("deepseek_v2", "rope_interleave", False,
                     "DeepSeek-V2 rotates adjacent pairs (deepseek_v3 takes RoPE on the two halves)")
    dense, moe = dense_and_moe_layers(cfg)
    require_dense_then_moe(cfg, "deepseek_v2",
                           "DeepSeek-V2's dense layers are the first first_k_dense_replace ones and every later layer "
                           "is MoE; no family with multi-head latent attention takes another pattern")
    if cfg.scoring_func != "softmax":
        raise refuse("deepseek_v2", "scoring_func", cfg.scoring_func,
                     "DeepSeek-V2 scores experts with a softmax (deepseek_v3 takes sigmoid scores)")
    if cfg.use_expert_bias:
        raise refuse("deepseek_v2", "use_expert_bias", True,
                     "DeepSeek-V2 has no score correction bias (deepseek_v3 has one)")
    if cfg.norm_topk_prob or cfg.topk_before_softmax:
        field_name = "norm_topk_prob" if cfg.norm_topk_prob else "topk_before_softmax"
        raise refuse("deepseek_v2", field_name, True,
                     "DeepSeek-V2 combines the k softmax scores as they are, never renormalised (deepseek_v3 "
                     "renormalises its sigmoid scores; mixtral, qwen2_moe, qwen3_moe and olmoe take renormalised "
                     "softmax without multi-head latent attention)")
    if moe and cfg.num_shared_experts == 0:
        raise refuse("deepseek_v2", "num_shared_experts", 0,
                     "DeepSeek-V2's MoE layers always have shared experts (qwen3_moe has none, but no multi-head "
                     "latent attention)")
    require_shared_width(cfg, "deepseek_v2",
                         "DeepSeek-V2's shared experts are n_shared_experts·moe_intermediate_size wide")
    grouped = cfg.n_group is not None and cfg.topk_group < cfg.n_group  # a limit keeping every group is none
    if grouped and cfg.group_score != "max":
        raise refuse("deepseek_v2", "group_score", cfg.group_score,
                     "DeepSeek-V2 ranks a group by its best expert (deepseek_v3 by the sum of its two best)")
    return {
        **common_from_hf_moe(cfg),
        **{name: getattr(cfg, name) for name in MLA_FIELDS},
        "attention_bias": cfg.attention_bias,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.num_experts,
        "first_k_dense_replace": len(dense),
        "n_shared_experts": cfg.num_shared_experts,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": False,
        "topk_method": "group_limited_greedy" if grouped else "greedy",
        "n_group": cfg.n_group if grouped else None,
        "topk_group": cfg.topk_group if grouped else None,
    }


DEEPSEEK_V2 = MoeFamily(
    model_type="deepseek_v2",
    architecture="DeepseekV2ForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | _MOE_FIELDS | set(MLA_FIELDS) | set(_ASSUMED) | {
        "qk_head_dim", "attention_bias", "mlp_bias", "pretraining_tp", "ep_size", "aux_loss_alpha", "seq_aux"},
)
