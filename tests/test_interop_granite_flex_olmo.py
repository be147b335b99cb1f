"""Granite MoE (with and without its shared MLP) and FlexOlmo beyond the per-family checks of `test_interop.py`: hf-moe
models with Granite's multipliers or FlexOlmo's norms after each sublayer export to them (`--to auto` too) with their
logits, what those families lack is refused, and Granite MoE Hybrid (Mamba layers) stays refused by name."""

import json

import pytest

from hf_moe import HfMoeForCausalLM
from hf_moe.interop import InteropError

from .test_interop_exports import export_by_auto

GRANITE = dict(embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=6.0, tie_word_embeddings=True)
FLEX_OLMO = dict(norm_placement="post", qk_norm=True, qk_norm_scope="projection", head_dim=16, norm_topk_prob=False)


@pytest.mark.parametrize("settings,family,named", [
    (GRANITE, "granitemoe", None),
    ({**GRANITE, "attention_multiplier": 0.125}, "granitemoe", None),
    ({**GRANITE, "num_shared_experts": 1, "shared_expert_intermediate_size": 40}, "granitemoeshared", None),
    ({**GRANITE, "num_shared_experts": 1, "shared_expert_gate": True}, "granitemoeshared", "shared_expert_gate=True"),
    ({**GRANITE, "norm_placement": "post"}, "granitemoe", "norm_placement='post'"),
    ({**GRANITE, "moe_layers": [1]}, "granitemoe", r"moe_layers=\[1\]"),
    ({**GRANITE, "topk_before_softmax": False, "norm_topk_prob": False}, "granitemoe", "norm_topk_prob=False"),
    (FLEX_OLMO, "flex_olmo", None),
    ({**FLEX_OLMO, "qk_norm_scope": "head"}, "flex_olmo", "qk_norm_scope='head'"),
    ({**FLEX_OLMO, "residual_multiplier": 0.5}, "flex_olmo", "residual_multiplier=0.5"),
])
def test_models_with_multipliers_or_norms_after_sublayers_export_to_granite_or_flex_olmo(tmp_path, settings, family,
                                                                                        named):
    """Granite writes the softmax scale hf-moe's default implies (`head_dim**-0.5`) when the model sets none."""
    exported = export_by_auto(tmp_path, settings, family, named)
    if exported is not None and family.startswith("granite"):
        assert exported.config.attention_multiplier == settings.get("attention_multiplier", 8**-0.5)


def test_granite_moe_hybrid_is_refused_by_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "granitemoehybrid"}))
    with pytest.raises(InteropError, match="model_type='granitemoehybrid'.*does not import"):
        HfMoeForCausalLM.from_pretrained(tmp_path)
