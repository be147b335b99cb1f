"""Mistral 4 (`model_type="mistral4"`, the text model of Mistral-Small-4): DeepSeek-V3's multi-head latent attention
(`hf_moe.mla`, the same tensor names) whose queries are scaled by Llama 4's position-dependent temperature
(`rope_parameters["llama_4_scaling_beta"]`), the first `first_k_dense_replace` layers dense, then MoE layers with
softmax scores over all experts, group-limited top-k (a group ranked by the sum of its two best scores), the k scores
optionally renormalised, times `routed_scaling_factor`, and `n_shared_experts` ungated shared experts.

Its config keeps `head_dim` = `qk_nope_head_dim + qk_rope_head_dim`; its RoPE rotates `int(head_dim ·
partial_rotary_factor)` dimensions (YaRN, as released) or all `head_dim` (its default RoPE, which ignores the factor):
that must be `qk_rope_head_dim`, the rotary width of the queries and keys.
transformers saves its routed experts fused (`experts.gate_up_proj`, `experts.down_proj`) and registers no
`AutoModelForCausalLM` for it: exports load with `Mistral4ForCausalLM`. Mistral-Small-4's own release is a
`mistral3` vision-language checkpoint around this text model, which hf-moe does not import.
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
    mla_fields,
    refuse,
    require_dense_then_moe,
    require_shared_width,
)

_BETA = "llama_4_scaling_beta"
_UNREAD_ROPE_KEYS = ("partial_rotary_factor", "max_position_embeddings")  # derived, or read by no RoPE code


def _rotated(cfg: PretrainedConfig) -> tuple[str, Any, int]:
    """(the field that decides it, its value, the number of dimensions of each head transformers' Mistral4 rotates):
    its own default RoPE rotates all `head_dim`, scaled RoPE (YaRN, ...) `int(head_dim · partial_rotary_factor)`."""
    rope_type = cfg.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        return "rope_parameters['rope_type']", rope_type, cfg.head_dim
    factor = cfg.rope_parameters.get("partial_rotary_factor", 1.0)
    return "rope_parameters['partial_rotary_factor']", factor, int(cfg.head_dim * factor)


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    rope = cfg.rope_parameters or {}
    if rope.get(_BETA) is None:
        raise refuse("mistral4", f"rope_parameters['{_BETA}']", None,
                     "transformers' Mistral4 multiplies the queries by 1 + β·ln(1 + ⌊position / "
                     "original_max_position_embeddings⌋) and fails without β")
    field_name, value, rotated = _rotated(cfg)
    if rotated != cfg.qk_rope_head_dim:
        raise refuse("mistral4", field_name, value,
                     f"transformers' Mistral4 then rotates {rotated} dimensions of each head (of head_dim="
                     f"{cfg.head_dim}), not the qk_rope_head_dim={cfg.qk_rope_head_dim} its queries and keys have")
    if cfg.n_group is None or cfg.n_routed_experts // cfg.n_group < 2:
        raise refuse("mistral4", "n_group", cfg.n_group,
                     "transformers' Mistral4 ranks a group by its two best experts (it needs n_group, and at least two "
                     "experts in each group)")
    if not cfg.n_shared_experts:
        raise refuse("mistral4", "n_shared_experts", cfg.n_shared_experts,
                     "transformers' Mistral4 then builds zero-width shared experts; hf-moe has none")
    fields = common_to_hf_moe(cfg)
    kept = {k: v for k, v in fields["rope_parameters"].items() if k not in _UNREAD_ROPE_KEYS}
    if rope[_BETA]:
        kept[_BETA] = rope[_BETA]
    elif kept.get("rope_type", "default") == "default":
        kept.pop("original_max_position_embeddings", None)  # read only by the temperature, which β = 0 leaves at 1
    fields.update(rope_parameters=kept, head_dim=cfg.qk_rope_head_dim)
    return {
        **fields,
        **mla_fields(cfg),
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.n_routed_experts,
        "first_k_dense": cfg.first_k_dense_replace or 0,
        "num_shared_experts": cfg.n_shared_experts,
        "scoring_func": "softmax",
        "norm_topk_prob": bool(cfg.norm_topk_prob),
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "router_aux_loss_type": "none",
    }


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if not cfg.is_mla:
        raise refuse("mistral4", "kv_lora_rank", None,
                     "Mistral 4's attention is multi-head latent attention (grouped-query models export to mixtral, "
                     "qwen2_moe, qwen3_moe, olmoe, glm4_moe, dots1, minimax_m2, ernie4_5_moe, hunyuan_v1_moe or hy_v3)")
    if cfg.scoring_func != "softmax" or cfg.use_expert_bias:
        field_name, value = (("scoring_func", cfg.scoring_func) if cfg.scoring_func != "softmax"
                             else ("use_expert_bias", True))
        raise refuse("mistral4", field_name, value,
                     "Mistral 4 selects by plain softmax scores (deepseek_v3 and glm4_moe_lite take sigmoid scores "
                     "with an expert bias)")
    n_group = cfg.n_group or 1
    if cfg.num_experts // n_group < 2 or (cfg.n_group is not None and cfg.group_score != "top2_sum"):
        field_name, value = (("n_group", cfg.n_group) if cfg.num_experts // n_group < 2
                             else ("group_score", cfg.group_score))
        raise refuse("mistral4", field_name, value,
                     "Mistral 4 ranks a group by the sum of its two best experts (deepseek_v2 ranks it by its best)")
    _, moe = dense_and_moe_layers(cfg)
    require_dense_then_moe(cfg, "mistral4",
                           "Mistral 4's dense layers are the first first_k_dense_replace ones and every later layer is "
                           "MoE (glm4_moe_lite takes any pattern, with sigmoid routing)")
    if moe and (cfg.num_shared_experts == 0 or cfg.shared_expert_gate):
        field_name, value = (("num_shared_experts", 0) if cfg.num_shared_experts == 0
                             else ("shared_expert_gate", True))
        raise refuse("mistral4", field_name, value,
                     "Mistral 4's MoE layers always add ungated shared experts (deepseek_v2 takes softmax routing "
                     "with them too)")
    require_shared_width(cfg, "mistral4",
                         "Mistral 4's shared experts are n_shared_experts·moe_intermediate_size wide")
    fields = common_from_hf_moe(cfg)
    fields.pop("head_dim")  # Mistral4's config derives it (qk_nope_head_dim + qk_rope_head_dim)
    head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    rope = {_BETA: 0.0, "original_max_position_embeddings": cfg.max_position_embeddings, **fields["rope_parameters"],
            "partial_rotary_factor": cfg.qk_rope_head_dim / head_dim}
    fields["rope_parameters"] = rope
    return {
        **fields,
        **mla_fields(cfg),
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.num_experts,
        "first_k_dense_replace": cfg.num_hidden_layers - len(moe),
        "n_shared_experts": cfg.num_shared_experts,
        "n_group": n_group,
        "topk_group": cfg.topk_group or n_group,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
    }


MISTRAL4 = MoeFamily(
    model_type="mistral4",
    architecture="Mistral4ForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | set(MLA_FIELDS) | {
        "qk_head_dim", "rope_interleave", "attention_bias", "pretraining_tp", "intermediate_size",
        "moe_intermediate_size", "n_routed_experts", "first_k_dense_replace", "n_shared_experts", "n_group",
        "topk_group", "norm_topk_prob", "routed_scaling_factor"},
    fused_experts=("experts.gate_up_proj", "experts.down_proj"),
)
