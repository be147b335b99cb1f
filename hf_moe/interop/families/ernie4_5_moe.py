"""ERNIE-4.5-MoE (`model_type="ernie4_5_moe"`): grouped-query attention with RoPE on adjacent pairs
(`rope_interleave`), MoE layers every `moe_layer_interval`-th layer from `moe_layer_start_index` to
`moe_layer_end_index` (the others dense), softmax scores over all experts with a selection-only expert bias
(saved as `mlp.moe_statics.e_score_correction_bias`, a `[1, E]` row), the k chosen scores renormalised, and
`moe_num_shared_experts` ungated shared experts `moe_intermediate_size` wide each.

The renormalisation divides by the k scores' sum floored at `moe_norm_min` (1e-12 by default), hf-moe by the sum
itself: the floor changes the weights only when the chosen experts' probabilities sum below it, which a softmax gives
only if the expert bias selects experts the router all but excludes; a larger floor is refused. `use_bias=True` (a
bias on every projection, MLPs and LM head included) is refused: hf-moe's MLPs and head have none.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ...configuration_hf_moe import HfMoeConfig
from ..family import (
    COMMON_HANDLED,
    MoeFamily,
    common_from_hf_moe,
    common_to_hf_moe,
    dense_and_moe_layers,
    refuse,
    require_shared_width,
)

DEFAULT_NORM_MIN = 1e-12
_MOE_FIELDS = frozenset({"intermediate_size", "moe_intermediate_size", "moe_num_experts", "moe_k",
                         "moe_num_shared_experts", "moe_layer_start_index", "moe_layer_end_index",
                         "moe_layer_interval", "moe_norm_min", "use_bias"})


def _moe_layers(cfg: PretrainedConfig) -> list[int]:
    start, end, interval = cfg.moe_layer_start_index, cfg.moe_layer_end_index, cfg.moe_layer_interval
    return [i for i in range(cfg.num_hidden_layers) if (i + 1) % interval == 0 and start <= i <= end]


def to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    if cfg.use_bias:
        raise refuse("ernie4_5_moe", "use_bias", cfg.use_bias,
                     "ERNIE-4.5 then puts biases on every MLP and on the LM head, which hf-moe's have not (qwen3_moe "
                     "and olmoe take attention biases)")
    if cfg.moe_norm_min > DEFAULT_NORM_MIN:
        raise refuse("ernie4_5_moe", "moe_norm_min", cfg.moe_norm_min,
                     f"hf-moe renormalises by the k weights' sum itself; a floor above {DEFAULT_NORM_MIN} may bind")
    return {
        **common_to_hf_moe(cfg),
        "rope_interleave": True,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.moe_num_experts,
        "moe_layers": _moe_layers(cfg),
        "num_shared_experts": cfg.moe_num_shared_experts,
        "scoring_func": "softmax",
        "use_expert_bias": True,
        "norm_topk_prob": True,
    }


def _layer_range(cfg: HfMoeConfig) -> tuple[int, int, int]:
    """(start, end, interval) of ERNIE-4.5's MoE layers that select exactly the MoE layers of `cfg`."""
    _, moe = dense_and_moe_layers(cfg)
    start, end = moe[0], moe[-1]
    for interval in range(1, cfg.num_hidden_layers + 1):
        if [i for i in range(start, end + 1) if (i + 1) % interval == 0] == moe:
            return start, end, interval
    raise refuse("ernie4_5_moe", "moe_layers", moe,
                 "ERNIE-4.5's MoE layers are every moe_layer_interval-th layer between moe_layer_start_index and "
                 "moe_layer_end_index (qwen2_moe and qwen3_moe take any set of MoE layers)")


def from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    if cfg.is_mla:
        raise refuse("ernie4_5_moe", "kv_lora_rank", cfg.kv_lora_rank,
                     "ERNIE-4.5's attention is grouped-query attention (deepseek_v2 and deepseek_v3 take multi-head "
                     "latent attention)")
    if not cfg.rope_interleave:
        raise refuse("ernie4_5_moe", "rope_interleave", False,
                     "ERNIE-4.5 rotates adjacent pairs (mixtral, qwen2_moe, qwen3_moe, olmoe and glm4_moe rotate the "
                     "two halves)")
    if cfg.attention_bias or cfg.qkv_bias:
        field_name = "attention_bias" if cfg.attention_bias else "qkv_bias"
        raise refuse("ernie4_5_moe", field_name, True,
                     "ERNIE-4.5's attention biases come only with biases on every MLP and the LM head (use_bias)")
    if cfg.scoring_func != "softmax":
        raise refuse("ernie4_5_moe", "scoring_func", cfg.scoring_func,
                     "ERNIE-4.5 scores experts with a softmax (glm4_moe and deepseek_v3 take sigmoid scores)")
    if not cfg.use_expert_bias:
        raise refuse("ernie4_5_moe", "use_expert_bias", False,
                     "ERNIE-4.5 always selects with an expert bias; set use_expert_bias=True (a zero bias selects the "
                     "same experts)")
    if cfg.shared_expert_gate:
        raise refuse("ernie4_5_moe", "shared_expert_gate", True,
                     "ERNIE-4.5's shared experts are ungated (qwen2_moe takes a gated shared expert)")
    require_shared_width(cfg, "ernie4_5_moe",
                         "ERNIE-4.5's shared experts are moe_num_shared_experts·moe_intermediate_size wide")
    start, end, interval = _layer_range(cfg)
    fields = common_from_hf_moe(cfg)
    del fields["attention_dropout"]  # not an ERNIE-4.5 field: its attention never drops
    del fields["num_experts_per_tok"]  # ERNIE-4.5's moe_k
    return {
        **fields,
        "use_bias": False,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "moe_num_experts": cfg.num_experts,
        "moe_k": cfg.num_experts_per_tok,
        "moe_num_shared_experts": cfg.num_shared_experts,
        "moe_layer_start_index": start,
        "moe_layer_end_index": end,
        "moe_layer_interval": interval,
    }


ERNIE4_5_MOE = MoeFamily(
    model_type="ernie4_5_moe",
    architecture="Ernie4_5_MoeForCausalLM",
    to_hf_moe=to_hf_moe,
    from_hf_moe=from_hf_moe,
    handled_fields=COMMON_HANDLED | _MOE_FIELDS,
    expert_bias="moe_statics.e_score_correction_bias",
    expert_bias_as_row=True,
)
