"""Granite MoE (`model_type="granitemoe"`, IBM Granite 3.x MoE, e.g. granite-3.1-3b-a800m) and Granite MoE with a
shared MLP (`granitemoeshared`): Llama's attention and every layer MoE, plus four multipliers: on the embeddings, on
each sublayer's output before the residual add, as the attention's softmax scale, and dividing the logits.

The router (`router.layer`) takes the top-k logits and the softmax over those k (`topk_before_softmax`); the routed
experts are saved fused only, `input_linear` `[E, 2I, H]` (each expert's gate rows, then its up rows) and
`output_linear` `[E, H, I]`. `granitemoeshared` adds an ungated SwiGLU `shared_mlp` of `shared_intermediate_size`
(0: none) on the layer beside the MoE block, whose `input_linear` holds the gate's rows, then the up projection's.
Granite MoE Hybrid (`granitemoehybrid`, Mamba layers) is not imported.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import COMMON_HANDLED, ExpertNames, MoeFamily, common_from_hf_moe, common_to_hf_moe

MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
"""Granite's multipliers: the same names and meaning in `HfMoeConfig`."""


def _to_hf_moe(cfg: PretrainedConfig, shared_width: int) -> dict[str, Any]:
    return {
        **common_to_hf_moe(cfg),
        **{name: getattr(cfg, name) for name in MULTIPLIERS},
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.intermediate_size,
        "num_experts": cfg.num_local_experts,
        "attention_bias": cfg.attention_bias,
        "topk_before_softmax": True,
        "num_shared_experts": 1 if shared_width else 0,
        "shared_expert_intermediate_size": shared_width or None,
    }


def _from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    """Granite's config fields of `cfg`; the export's round trip refuses what they do not express (another attention,
    q/k norm, dense layers, other routing, norms after the sublayers)."""
    scale = cfg.head_dim**-0.5 if cfg.attention_multiplier is None else cfg.attention_multiplier
    return {
        **common_from_hf_moe(cfg),
        **{name: getattr(cfg, name) for name in MULTIPLIERS},
        "attention_multiplier": scale,
        "intermediate_size": cfg.moe_intermediate_size,
        "num_local_experts": cfg.num_experts,
        "attention_bias": cfg.attention_bias,
    }


_HANDLED = COMMON_HANDLED | set(MULTIPLIERS) | {"intermediate_size", "num_local_experts", "attention_bias"}
_NAMES = dict(moe_module="block_sparse_moe", router="router.layer.weight",
              fused_experts=("input_linear.weight", "output_linear.weight"))

GRANITEMOE = MoeFamily(
    model_type="granitemoe",
    architecture="GraniteMoeForCausalLM",
    to_hf_moe=lambda cfg: _to_hf_moe(cfg, 0),
    from_hf_moe=_from_hf_moe,
    handled_fields=_HANDLED,
    **_NAMES,
)

GRANITEMOESHARED = MoeFamily(
    model_type="granitemoeshared",
    architecture="GraniteMoeSharedForCausalLM",
    to_hf_moe=lambda cfg: _to_hf_moe(cfg, cfg.shared_intermediate_size),
    from_hf_moe=lambda cfg: {**_from_hf_moe(cfg), "shared_intermediate_size": cfg.shared_expert_size},
    handled_fields=_HANDLED | {"shared_intermediate_size"},
    shared_experts="shared_mlp",
    shared_expert_names=ExpertNames(gate="input_linear", up="input_linear", down="output_linear"),
    shared_experts_in_layer=True,
    **_NAMES,
)
