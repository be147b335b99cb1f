"""GLM-MoE-DSA (`model_type="glm_moe_dsa"`, GLM-5 and GLM-5.1): DeepSeek-V3.2's layers (`deepseek_v32`) whose
indexer rotates adjacent pairs (`indexer_rope_interleave`, which GLM's config.json states and transformers' class
assumes). Its config's `indexer_types` may name layers `"shared"` that reuse the previous full layer's selection
(IndexShare, GLM-5.2, derived from `index_topk_freq` / `index_skip_topk_offset` / `index_topk_pattern`): hf-moe runs
an indexer in every layer, so such a config is refused, naming `indexer_types`.
`index_share_for_mtp_iteration` concerns the multi-token-prediction layer, which is not loaded.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import MoeFamily, beyond_last_layer, refuse
from .deepseek_v32 import DSA_HANDLED, dsa_assumed, dsa_from_hf_moe, dsa_to_hf_moe

# Fields transformers' class folds into `indexer_types`, or that only the multi-token-prediction layer reads.
_INDEXER_SCHEDULE = {"indexer_types", "index_topk_freq", "index_skip_topk_offset", "index_topk_pattern",
                     "index_share_for_mtp_iteration"}


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    if any(kind != "full" for kind in cfg.indexer_types):
        raise refuse("glm_moe_dsa", "indexer_types", cfg.indexer_types,
                     "hf-moe runs every layer's own indexer; layers that reuse another layer's selection ('shared', "
                     "IndexShare) are not implemented")
    return dsa_to_hf_moe("glm_moe_dsa", cfg, indexer_rope_interleave=True)


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    return {**dsa_from_hf_moe("glm_moe_dsa", cfg, indexer_rope_interleave=True),
            "indexer_types": ["full"] * cfg.num_hidden_layers}


GLM_MOE_DSA = MoeFamily(
    model_type="glm_moe_dsa",
    architecture="GlmMoeDsaForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=frozenset(DSA_HANDLED | set(dsa_assumed(True)) | _INDEXER_SCHEDULE),
    ignored=beyond_last_layer,
)
