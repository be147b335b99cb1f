"""OLMoE (`model_type="olmoe"`): every layer MoE, softmax top-k, RMSNorm over the whole q and k projections.

OLMoE's experts are `intermediate_size` wide and it has no dense MLP; its `clip_qkv` (clamping q, k and v) has no
hf-moe counterpart and is refused unless unset.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import COMMON_HANDLED, MoeFamily, common_from_hf_moe, common_to_hf_moe, refuse


def moe_fields_to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    """The fields OLMoE and FlexOlmo map alike: `intermediate_size`-wide experts on every layer, q and k norms over
    the whole projections."""
    return {
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.intermediate_size,
        "num_experts": cfg.num_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "attention_bias": cfg.attention_bias,
        "qk_norm": True,
        "qk_norm_scope": "projection",
    }


def moe_fields_from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    """The inverse of [`moe_fields_to_hf_moe`]."""
    return {
        "intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "norm_topk_prob": cfg.norm_topk_prob,
        "attention_bias": cfg.attention_bias,
    }


MOE_HANDLED = frozenset({"intermediate_size", "num_experts", "norm_topk_prob", "attention_bias"})


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    if getattr(cfg, "clip_qkv", None) is not None:
        raise refuse("olmoe", "clip_qkv", cfg.clip_qkv, "hf-moe does not clamp q, k and v; only clip_qkv=None imports")
    fields = common_to_hf_moe(cfg)
    if fields["head_dim"] * cfg.num_attention_heads != cfg.hidden_size:
        raise refuse("olmoe", "head_dim", fields["head_dim"],
                     "OLMoE's k_norm is (hidden_size // num_attention_heads)·num_key_value_heads wide, which equals "
                     "the k projection only when head_dim = hidden_size // num_attention_heads")
    return {**fields, **moe_fields_to_hf_moe(cfg)}


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    fields = common_from_hf_moe(cfg)
    fields.pop("head_dim")  # OLMoE derives it from hidden_size
    return {**fields, **moe_fields_from_hf_moe(cfg), "clip_qkv": None}


OLMOE = MoeFamily(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | MOE_HANDLED | {"clip_qkv"},
)
