"""DeepSeek-V3.2 (`model_type="deepseek_v32"`, DeepSeek-V3.2 and V3.2-Exp): DeepSeek-V3's multi-head latent attention
and routing (`deepseek_v3`) with DeepSeek sparse attention (`hf_moe.sparse_attention`): in every layer a lightning
indexer of `index_n_heads` heads of `index_head_dim` keeps each query's `index_topk` best keys. transformers' class
always rotates the latent attention's adjacent pairs and the indexer's halves (its config has no `rope_interleave`);
the MoE layers are the `"sparse"` entries of `mlp_layer_types` (derived from `first_k_dense_replace` when absent).
The indexer's tensors (`self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`) keep their names in hf-moe.

Fields of DeepSeek's own config.json that transformers' class does not read must say what it computes:
`scoring_func`, `topk_method`, `moe_layer_freq` as for DeepSeek-V3, and `rope_interleave`,
`indexer_rope_interleave` and `mlp_bias` (when present) the rotations above and no MLP bias; `ep_size`,
`aux_loss_alpha` and `seq_aux` are training or serving settings. The multi-token-prediction layers after the last
layer are not part of the causal LM and are not loaded. The helpers here serve GLM-MoE-DSA (`glm_moe_dsa`) too.
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
    mlp_layer_types,
    refuse,
    refuse_unread,
    require_deepseek_routing,
    require_dense_then_moe,
)

SPARSE_ATTENTION_FIELDS = ("index_topk", "index_n_heads", "index_head_dim")
"""The lightning indexer's sizes: the same names in transformers' DSA configs and hf-moe's."""
DSA_HANDLED = (COMMON_HANDLED | DEEPSEEK_MOE_HANDLED | set(MLA_FIELDS) | set(SPARSE_ATTENTION_FIELDS)
               | {"qk_head_dim", "attention_bias", "mlp_layer_types", "pretraining_tp", "ep_size", "aux_loss_alpha",
                  "seq_aux"})
"""Config fields every DeepSeek-sparse-attention family maps (its own unread fields are added by each family)."""


def dsa_assumed(indexer_rope_interleave: bool) -> dict[str, Any]:
    """The config.json fields a DSA family's transformers class does not read: the value its code takes as given."""
    return {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "mlp_bias": False,
            "rope_interleave": True, "indexer_rope_interleave": indexer_rope_interleave}


def dsa_to_hf_moe(family: str, cfg: PretrainedConfig, indexer_rope_interleave: bool) -> dict[str, Any]:
    """The `HfMoeConfig` keyword arguments of a DSA family's config (`family` names it in refusals): DeepSeek-V3's
    latent attention on adjacent pairs and routing, the MoE layers of `mlp_layer_types`, and the indexer."""
    refuse_unread(family, cfg, dsa_assumed(indexer_rope_interleave))
    return {
        **common_to_hf_moe(cfg),
        **{name: getattr(cfg, name) for name in MLA_FIELDS},
        "rope_interleave": True,
        "attention_bias": cfg.attention_bias,
        **deepseek_moe_to_hf_moe(cfg),
        "first_k_dense": 0,
        "moe_layers": [i for i, kind in enumerate(cfg.mlp_layer_types) if kind == "sparse"],
        **{name: getattr(cfg, name) for name in SPARSE_ATTENTION_FIELDS},
        "indexer_rope_interleave": indexer_rope_interleave,
    }


def dsa_from_hf_moe(family: str, cfg: HfMoeConfig, indexer_rope_interleave: bool) -> dict[str, Any]:
    """The config keyword arguments of the DSA `family` for an hf-moe config; refuses what it cannot express."""
    if cfg.index_topk is None:
        raise refuse(family, "index_topk", None,
                     f"{family}'s attention is DeepSeek sparse attention (latent attention without an indexer exports "
                     "to deepseek_v3 or glm4_moe_lite)")
    if not cfg.rope_interleave:
        raise refuse(family, "rope_interleave", False,
                     f"{family}'s latent attention rotates adjacent pairs (glm4_moe_lite and deepseek_v3 take either)")
    if cfg.indexer_rope_interleave != indexer_rope_interleave:
        other = "glm_moe_dsa" if family == "deepseek_v32" else "deepseek_v32"
        raise refuse(family, "indexer_rope_interleave", cfg.indexer_rope_interleave,
                     f"{family}'s indexer rotates {'adjacent pairs' if indexer_rope_interleave else 'halves'} "
                     f"({other}'s the other way)")
    require_deepseek_routing(cfg, family)
    require_dense_then_moe(cfg, family,
                           f"{family}'s own code takes its dense layers from first_k_dense_replace: the first ones, "
                           "then every layer MoE")
    fields = common_from_hf_moe(cfg)
    fields.pop("head_dim")  # the class sets head_dim to qk_rope_head_dim
    moe_fields = deepseek_moe_from_hf_moe(cfg, family)
    moe_fields.pop("num_nextn_predict_layers")  # not a field of the class
    return {
        **fields,
        **{name: getattr(cfg, name) for name in MLA_FIELDS},
        "attention_bias": cfg.attention_bias,
        **moe_fields,
        "mlp_layer_types": mlp_layer_types(cfg),
        **{name: getattr(cfg, name) for name in SPARSE_ATTENTION_FIELDS},
    }


DEEPSEEK_V32 = MoeFamily(
    model_type="deepseek_v32",
    architecture="DeepseekV32ForCausalLM",
    to_hf_moe=lambda cfg: dsa_to_hf_moe("deepseek_v32", cfg, indexer_rope_interleave=False),
    from_hf_moe=lambda cfg: dsa_from_hf_moe("deepseek_v32", cfg, indexer_rope_interleave=False),
    handled_fields=frozenset(DSA_HANDLED | set(dsa_assumed(False))),
    ignored=beyond_last_layer,
)
