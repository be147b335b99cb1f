"""A foreign MoE family as one declarative entry: its config mapping both ways, its tensor names, its refusals.

See the package docstring (`hf_moe.interop`) for the contract a family entry fulfils.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ..configuration_hf_moe import HfMoeConfig


class InteropError(ValueError):
    """A foreign checkpoint or config, or an hf-moe model, that a family cannot express exactly. Raised before
    anything is loaded or written; the message names the field or tensor."""


@dataclass(frozen=True)
class ExpertNames:
    """The names of one routed expert's three projections in the per-expert layout transformers 5 saves
    (`experts.{e}.{gate}.weight`, ...)."""

    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


@dataclass(frozen=True)
class MoeFamily:
    """One foreign architecture (a transformers `model_type`) that hf-moe imports and exports exactly.

    Config: `to_hf_moe(foreign_config)` returns `HfMoeConfig` keyword arguments and `from_hf_moe(hf_moe_config)`
    the foreign config class's keyword arguments; both raise [`InteropError`] naming a field they cannot express.
    An export is also checked by mapping its config back: what does not survive the round trip is refused.

    Tensors: everything outside an MoE block keeps its name (embeddings, attention, norms, dense MLPs, head) except
    where `renames` says otherwise; inside MoE layer `i` the hf-moe names map onto
    `model.layers.{i}.{moe_module}.{router | expert_bias | shared_experts | shared_expert_gate | experts...}`.
    """

    model_type: str
    architecture: str
    to_hf_moe: Callable[[PretrainedConfig], dict[str, Any]]
    from_hf_moe: Callable[[HfMoeConfig], dict[str, Any]]
    handled_fields: frozenset[str]
    """Foreign config fields the mapping reads or knows to leave out; any other field whose value differs from the
    foreign class's default is refused on import (a field this version does not know may change the function)."""
    moe_module: str = "mlp"
    fused_moe_module: str = "mlp"
    """The MoE module's name in transformers' in-memory model, which a checkpoint with fused experts written straight
    from its state dict uses (Mixtral saves `block_sparse_moe` but holds `mlp`)."""
    router: str = "gate.weight"
    expert_bias: str = "gate.e_score_correction_bias"
    experts: str = "experts"
    expert_names: ExpertNames = ExpertNames()
    shared_experts: str = "shared_experts"
    shared_expert_gate: str = "shared_expert_gate.weight"
    expert_bias_as_row: bool = False
    """The expert bias is saved as one `[1, E]` row (ERNIE-4.5's, one row per expert group) rather than `[E]`."""
    fused_experts: tuple[str, str] | None = None
    """transformers saves this family's routed experts fused, as these two tensors of the MoE module: `[E, 2I, H]`
    (each expert's gate rows, then its up rows) and `[E, H, I]` (Mistral 4's `experts.gate_up_proj` /
    `experts.down_proj`, Granite's `input_linear.weight` / `output_linear.weight`). An export writes them so; an
    import reads them so wherever a checkpoint has these names, per expert otherwise (`fused_names`)."""
    shared_expert_names: ExpertNames = ExpertNames()
    """The shared experts' projections; `gate == up` names one tensor holding both, the gate's rows first (Granite's
    `input_linear`)."""
    shared_experts_in_layer: bool = False
    """The shared experts are a module of the decoder layer (`model.layers.{i}.{shared_experts}`, Granite's
    `shared_mlp`) rather than of the MoE module."""
    renames: tuple[tuple[str, str], ...] = ()
    """Extra `(hf-moe regex, foreign replacement)` pairs applied with `re.sub` to every hf-moe name outside the
    routed experts, after the MoE-block names above (e.g. attention projections named otherwise)."""
    ignored: Callable[[PretrainedConfig, str], bool] | None = None
    """Foreign tensors the family's own class does not load either (e.g. multi-token-prediction layers)."""

    def foreign_config(self, **kwargs: Any) -> PretrainedConfig:
        """The family's transformers config class built from `kwargs` (validated by transformers)."""
        return AutoConfig.for_model(self.model_type, **kwargs)

    def fused_names(self, layer: int) -> tuple[str, str]:
        """The foreign names of MoE layer `layer`'s fused routed experts `[E, 2I, H]`, `[E, H, I]`: `fused_experts`,
        else transformers' in-memory `{experts}.gate_up_proj` / `{experts}.down_proj`, which any family imports."""
        gate_up, down = self.fused_experts or (f"{self.experts}.gate_up_proj", f"{self.experts}.down_proj")
        prefix = f"model.layers.{layer}.{self.moe_module}."
        return prefix + gate_up, prefix + down

    def foreign_name(self, name: str, moe_layers: set[int]) -> str:
        """The foreign name of the hf-moe tensor `name` (the routed experts excluded: see `hf_moe.interop.plan`)."""
        return self.foreign_rows(name, moe_layers)[0]

    def foreign_rows(self, name: str, moe_layers: set[int]) -> tuple[str, int, int]:
        """`(foreign name, k, n)`: the hf-moe tensor `name` is the k-th of `n` equal blocks of rows of that foreign
        tensor, `n = 1` being all of it (the routed experts excluded: see `hf_moe.interop.plan`)."""
        match = _MOE_PART.fullmatch(name)
        if match and int(match.group(1)) in moe_layers:
            layer, part = match.group(1), match.group(2)
            prefix = f"model.layers.{layer}.{self.moe_module}."
            for ours, theirs in (("router.weight", self.router), ("router.expert_bias", self.expert_bias),
                                 ("shared_expert_gate.weight", self.shared_expert_gate)):
                if part == ours:
                    return prefix + theirs, 0, 1
            shared = _SHARED_PROJECTION.fullmatch(part)
            if shared:
                names, projection = self.shared_expert_names, shared.group(1)
                theirs = {"gate_proj": names.gate, "up_proj": names.up, "down_proj": names.down}[projection]
                where = f"model.layers.{layer}." if self.shared_experts_in_layer else prefix
                stacked = names.gate == names.up and projection != "down_proj"
                block, blocks = (int(projection == "up_proj"), 2) if stacked else (0, 1)
                return f"{where}{self.shared_experts}.{theirs}.weight", block, blocks
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        return name, 0, 1


_MOE_PART = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")
_SHARED_PROJECTION = re.compile(r"shared_experts\.(gate_proj|up_proj|down_proj)\.weight")

FAMILIES: dict[str, MoeFamily] = {}
"""transformers `model_type` → [`MoeFamily`]: the foreign families hf-moe imports and exports."""


def register_family(family: MoeFamily) -> MoeFamily:
    """Make `family` importable (`HfMoeForCausalLM.from_pretrained`) and exportable (`hf-moe convert --to`)."""
    if family.model_type in FAMILIES and FAMILIES[family.model_type] is not family:
        raise ValueError(f"register_family: model_type {family.model_type!r} is already registered.")
    FAMILIES[family.model_type] = family
    return family


# Fields every family maps the same way (transformers' Llama names): copied from the foreign config.
COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "tie_word_embeddings",
    "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id", "num_experts_per_tok",
)
COMMON_HANDLED = frozenset(COMMON_FIELDS) | {"rope_parameters", "rope_scaling", "rope_theta", "head_dim",
                                             "router_aux_loss_coef", "output_router_logits", "layer_types"}


def common_to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    """The fields every family shares, plus RoPE and the resolved `head_dim`. Llama 4's query temperature
    (`rope_parameters["llama_4_scaling_beta"]`) is left out: only the families whose class reads it map it."""
    fields = {name: getattr(cfg, name) for name in COMMON_FIELDS if name != "attention_dropout"}
    fields["attention_dropout"] = getattr(cfg, "attention_dropout", 0.0)  # ERNIE-4.5 has none: it never drops
    fields["head_dim"] = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = {k: v for k, v in (cfg.rope_parameters or {}).items() if k != "llama_4_scaling_beta"}
    if "partial_rotary_factor" not in rope and getattr(cfg, "partial_rotary_factor", None) is not None:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor  # versions that keep it beside rope_parameters
    fields["rope_parameters"] = rope
    fields["router_aux_loss_coef"] = getattr(cfg, "router_aux_loss_coef", 0.0)
    fields["output_router_logits"] = getattr(cfg, "output_router_logits", False)
    return fields


def common_from_hf_moe(cfg: HfMoeConfig) -> dict[str, Any]:
    fields = {name: getattr(cfg, name) for name in COMMON_FIELDS}
    fields.update(head_dim=cfg.head_dim, rope_parameters=dict(cfg.rope_parameters or {}),
                  router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=cfg.output_router_logits)
    return fields


def refuse(family: str, field_name: str, value: Any, why: str) -> InteropError:
    """An [`InteropError`] naming the field, its value and why `family` cannot express it."""
    return InteropError(f"{family}: {field_name}={value!r} cannot be expressed exactly: {why}.")


def attention_layers_to_hf_moe(family: str, layer_types: list[str], sliding_window: int | None) -> dict[str, Any]:
    """`sliding_window` and `layer_types` of an hf-moe config from a foreign config's per-layer attention types (as
    its class resolved them) and window: `layer_types` only where the layers mix full and sliding attention, no
    window where no layer slides."""
    types = list(layer_types)
    unknown = [t for t in types if t not in ("full_attention", "sliding_attention")]
    if unknown:
        raise refuse(family, "layer_types", types,
                     f"hf-moe's layers attend to everything or within a sliding window (not {unknown[0]!r})")
    if "sliding_attention" not in types:
        return {"sliding_window": None, "layer_types": None}
    if not sliding_window:
        raise refuse(family, "sliding_window", sliding_window,
                     f"layer_types={types} names sliding layers, whose mask a window of {sliding_window!r} empties")
    return {"sliding_window": sliding_window, "layer_types": types if "full_attention" in types else None}


def sliding_layers(cfg: HfMoeConfig) -> list[int]:
    """The indices of an hf-moe config's sliding-window layers."""
    return [i for i, kind in enumerate(cfg.attention_layer_types) if kind == "sliding_attention"]


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def beyond_last_layer(cfg: PretrainedConfig, name: str) -> bool:
    """Whether the foreign tensor `name` belongs to a layer after the last decoder layer: the multi-token-prediction
    modules GLM-4.5 and DeepSeek-V3 checkpoints carry (`num_nextn_predict_layers`), which the causal LM does not
    use; an `ignored` rule for families that have them."""
    match = _LAYER.match(name)
    return match is not None and int(match.group(1)) >= cfg.num_hidden_layers


def dense_and_moe_layers(cfg: HfMoeConfig) -> tuple[list[int], list[int]]:
    """(dense layer indices, MoE layer indices) of an hf-moe config."""
    moe = cfg.moe_layer_indices
    return [i for i in range(cfg.num_hidden_layers) if i not in moe], moe


def moe_layers_from_types(family: str, cfg: PretrainedConfig, class_name: str) -> list[int]:
    """The MoE layers of a config that names each layer's MLP (`mlp_layer_types`, `"sparse"` or `"dense"`); a
    `first_k_dense_replace` beside it (the authors' field, which transformers' class ignores) must name the same."""
    moe = [i for i, kind in enumerate(cfg.mlp_layer_types) if kind == "sparse"]
    first_dense = getattr(cfg, "first_k_dense_replace", None)
    if first_dense is not None and moe != list(range(first_dense, cfg.num_hidden_layers)):
        raise refuse(family, "first_k_dense_replace", first_dense,
                     f"transformers' {class_name} ignores it and takes its MoE layers from mlp_layer_types="
                     f"{cfg.mlp_layer_types}, so the checkpoint's own code and transformers' disagree")
    return moe


def mlp_layer_types(cfg: HfMoeConfig) -> list[str]:
    """An hf-moe config's MoE layers as `mlp_layer_types` (`"sparse"` / `"dense"` per layer)."""
    moe = set(cfg.moe_layer_indices)
    return ["sparse" if i in moe else "dense" for i in range(cfg.num_hidden_layers)]


MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
"""Multi-head latent attention's widths (`hf_moe.mla`): the same names in DeepSeek-V2/V3's configs and hf-moe's."""


# DeepSeek-style routed MoE (DeepSeek-V3, GLM-4-MoE): the first `first_k_dense_replace` layers dense, then MoE layers
# with sigmoid scores, a selection-only expert bias, group-limited top-k, routed scaling and ungated shared experts;
# the multi-token-prediction layers after the last layer are not part of the causal LM.
DEEPSEEK_MOE_HANDLED = frozenset({
    "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_local_experts", "first_k_dense_replace",
    "n_shared_experts", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "num_nextn_predict_layers",
    "num_mtp_layers"})


def deepseek_moe_to_hf_moe(cfg: PretrainedConfig) -> dict[str, Any]:
    """The DeepSeek-style routed-MoE fields of a foreign config, as `HfMoeConfig` keyword arguments. A config
    without `first_k_dense_replace` or without `intermediate_size` (SolarOpen: every layer MoE, no dense MLP) maps
    to every layer MoE."""
    return {
        "intermediate_size": getattr(cfg, "intermediate_size", None) or cfg.moe_intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.n_routed_experts,
        "first_k_dense": getattr(cfg, "first_k_dense_replace", None) or 0,
        "num_shared_experts": cfg.n_shared_experts,
        "scoring_func": "sigmoid",
        "use_expert_bias": True,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": bool(cfg.norm_topk_prob),
        "router_aux_loss_type": "none",
    }


def require_dense_then_moe(cfg: HfMoeConfig, family: str, why: str) -> None:
    """Refuses an hf-moe config whose MoE layers are not all the layers after its dense ones (the
    `first_k_dense_replace` pattern of `family`); `why` is the refusal's explanation."""
    dense, moe = dense_and_moe_layers(cfg)
    if moe != list(range(len(dense), cfg.num_hidden_layers)):
        raise refuse(family, "moe_layers", moe, why)


def require_shared_width(cfg: HfMoeConfig, family: str, why: str) -> None:
    """Refuses an hf-moe config whose shared experts are not `num_shared_experts · moe_intermediate_size` wide, the
    width `family`'s config derives; `why` is the refusal's explanation."""
    if cfg.shared_expert_size != cfg.num_shared_experts * cfg.moe_intermediate_size:
        raise refuse(family, "shared_expert_intermediate_size", cfg.shared_expert_intermediate_size, why)


def deepseek_moe_from_hf_moe(cfg: HfMoeConfig, family: str) -> dict[str, Any]:
    """The DeepSeek-style routed-MoE fields of an hf-moe config, as `family`'s config keyword arguments (no
    multi-token-prediction layers). The caller has checked the routing is DeepSeek-style; the shared experts'
    width, which such a config derives, is checked here."""
    require_shared_width(cfg, family, f"{family}'s shared experts are n_shared_experts·moe_intermediate_size wide")
    dense, _ = dense_and_moe_layers(cfg)
    n_group = cfg.n_group or 1
    return {
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "n_routed_experts": cfg.num_experts,
        "first_k_dense_replace": len(dense),
        "n_shared_experts": cfg.num_shared_experts,
        "n_group": n_group,
        "topk_group": cfg.topk_group or n_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
        "num_nextn_predict_layers": 0,
    }


def require_deepseek_routing(cfg: HfMoeConfig, family: str) -> None:
    """Refuses an hf-moe config whose routing the DeepSeek-style `family` cannot express: it scores experts with a
    sigmoid, selects with an expert bias (`e_score_correction_bias`), ranks a group by its two best experts and always
    has shared experts."""
    if cfg.scoring_func != "sigmoid":
        raise refuse(family, "scoring_func", cfg.scoring_func,
                     f"{family} scores experts with a sigmoid (softmax routers export to mixtral, qwen2_moe, qwen3_moe "
                     "or olmoe)")
    if not cfg.use_expert_bias:
        raise refuse(family, "use_expert_bias", False,
                     f"{family} always selects with an expert bias; set use_expert_bias=True (a zero bias selects the "
                     "same experts)")
    if cfg.num_experts // (cfg.n_group or 1) < 2:
        raise refuse(family, "n_group", cfg.n_group,
                     f"{family} ranks a group by its two best experts, so every group needs at least two")
    if cfg.num_shared_experts == 0:
        raise refuse(family, "num_shared_experts", 0,
                     f"{family}'s MoE layers always have shared experts (qwen3_moe, mixtral, olmoe and minimax_m2 "
                     "have none)")


def mla_fields(cfg: PretrainedConfig | HfMoeConfig) -> dict[str, Any]:
    """The multi-head latent attention fields of a DeepSeek-V3-style config or of an hf-moe one, for the other: the
    widths (`MLA_FIELDS`), whether RoPE rotates adjacent pairs, and the projections' biases."""
    return {**{name: getattr(cfg, name) for name in MLA_FIELDS}, "rope_interleave": bool(cfg.rope_interleave),
            "attention_bias": cfg.attention_bias}


def require_rotary_factor(family: str, rope: dict[str, Any] | None, why: str) -> None:
    """Refuses a `partial_rotary_factor` other than 1 in `rope` (a RoPE parameters dict) for a `family` whose
    attention rotates every dimension of a head; `why` says whose attention does."""
    factor = (rope or {}).get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise refuse(family, "rope_parameters['partial_rotary_factor']", factor,
                     f"{why} (glm4_moe and minimax_m2 take partial rotary)")


def refuse_unread(family: str, cfg: PretrainedConfig, assumed: dict[str, Any]) -> None:
    """Refuses a foreign config whose fields that transformers' class does not read (the checkpoint's own config.json
    fields) say other than what the class computes: field → the value its code takes as given."""
    for field_name, value in assumed.items():
        if getattr(cfg, field_name, value) != value:
            raise refuse(family, field_name, getattr(cfg, field_name),
                         f"transformers' {family} class computes {field_name}={value!r} whatever config.json says, so "
                         "the checkpoint's own code and transformers' disagree")


def signature(cfg: HfMoeConfig) -> dict[str, Any]:
    """What an hf-moe config computes at inference, in canonical form: two configs with equal signatures compute
    the same function from the same tensors. Training-only settings (loss coefficients, noise, bias update rate,
    dropout, initialisation) are left out: an export keeps the weights, not the training recipe."""
    dense, moe = dense_and_moe_layers(cfg)
    softmax = cfg.scoring_func == "softmax"
    renormalised = cfg.norm_topk_prob or (softmax and cfg.topk_before_softmax)  # equal functions
    grouped = cfg.n_group is not None and cfg.topk_group < cfg.n_group  # a group limit that keeps every group is none
    sig = {name: getattr(cfg, name) for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "hidden_act", "rms_norm_eps", "tie_word_embeddings", "sliding_window", "attention_sinks", "qk_norm",
        "router_type",
        "num_experts", "num_experts_per_tok", "scoring_func", "routed_scaling_factor", "use_expert_bias",
        "drop_tokens", "shared_expert_gate", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
        "v_head_dim", "rope_interleave", "index_topk", "index_n_heads", "index_head_dim", "indexer_rope_interleave",
        "embedding_multiplier", "residual_multiplier", "logits_scaling", "norm_placement")}
    sig.update(
        sliding_window=cfg.sliding_window if sliding_layers(cfg) else None, layer_types=cfg.attention_layer_types,
        rope_parameters={"partial_rotary_factor": 1.0, **(cfg.rope_parameters or {})},
        qkv_bias=cfg.attention_bias or cfg.qkv_bias, o_proj_bias=cfg.attention_bias,
        qk_norm_scope=cfg.qk_norm_scope if cfg.qk_norm else None,
        qk_norm_order=cfg.qk_norm_order if cfg.qk_norm else None,
        moe_layers=moe, intermediate_size=cfg.intermediate_size if dense else None,
        moe_intermediate_size=cfg.moe_intermediate_size if moe else None,
        shared_expert_size=cfg.shared_expert_size, norm_topk_prob=renormalised,
        n_group=cfg.n_group if grouped else None, topk_group=cfg.topk_group if grouped else None,
        group_score=cfg.group_score if grouped else None,
        # the softmax scale grouped-query attention uses (MLA's own is fixed by its widths and RoPE)
        attention_multiplier=None if cfg.is_mla else cfg.attention_multiplier or cfg.head_dim**-0.5,
    )
    return sig


def differences(a: HfMoeConfig, b: HfMoeConfig) -> dict[str, tuple[Any, Any]]:
    """Signature fields where `a` and `b` differ: field → (a's value, b's value)."""
    sa, sb = signature(a), signature(b)
    return {k: (sa[k], sb[k]) for k in sa if sa[k] != sb[k]}

