"""FlexOlmo (`model_type="flex_olmo"`): OLMoE's MoE (every layer, softmax top-k, renormalised or not) with OLMo-2's
layer: no norm on a sublayer's input, an RMSNorm on its output before the residual add (`norm_placement="post"`:
`post_attention_layernorm`, `post_feedforward_layernorm`), and RMSNorm over the whole q and k projections.

Unlike OLMoE's, the k norm is `num_key_value_heads·head_dim` wide whatever `head_dim` is, so any `head_dim` imports.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import COMMON_HANDLED, MoeFamily, common_from_hf_moe, common_to_hf_moe
from .olmoe import MOE_HANDLED, moe_fields_from_hf_moe, moe_fields_to_hf_moe


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    return {**common_to_hf_moe(cfg), **moe_fields_to_hf_moe(cfg), "norm_placement": "post"}


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    return {**common_from_hf_moe(cfg), **moe_fields_from_hf_moe(cfg)}


FLEX_OLMO = MoeFamily(
    model_type="flex_olmo",
    architecture="FlexOlmoForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | MOE_HANDLED,
)
