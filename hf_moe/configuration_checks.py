"""The checks of `HfMoeConfig`'s fields by feature (routing, product keys, norms, attention), apart from
the config class so that it stays short enough to read. Each `validate_*(config, fail)` calls
`fail(field, value, expected)` for the first bad field it finds; the config turns that into the error."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .moe.router.registry import ROUTER_CLASSES

ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
ROUTER_AUX_LOSS_TYPES = ("switch", "sequence", "none")
ROUTER_GROUP_SCORES = ("top2_sum", "max")
LEARNED_TOKEN_CHOICE_ROUTERS = ("topk", "switch")
PRODUCT_KEY_QUERY_NORMS = ("layer_norm", "batch_norm", "running_norm", "none")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
QK_NORM_SCOPES = ("head", "projection")
QK_NORM_ORDERS = ("before_rope", "after_rope")
NORM_PLACEMENTS = ("pre", "post")
Fail = Callable[[str, Any, str], None]


def is_finite_number(value: Any) -> bool:
    """A real, finite int or float; bools and numeric strings are not numbers here."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def validate_routing(config: Any, fail: Fail) -> None:
    """The routing fields of `config` (an `HfMoeConfig` whose sizes were already checked)."""
    if config.router_type not in ROUTER_CLASSES:
        fail("router_type", config.router_type,
             f"one of {', '.join(sorted(ROUTER_CLASSES))} (add your own with hf_moe.register_router "
             "before building or loading the config)")
    for field in ("topk_before_softmax", "router_gumbel_noise", "drop_tokens", "renormalize_after_drop", "use_rts",
                  "use_expert_bias", "norm_topk_prob", "output_router_metrics"):
        if not isinstance(getattr(config, field), bool):
            fail(field, getattr(config, field), "True or False")
    if config.scoring_func not in ROUTER_SCORE_FUNCTIONS:
        fail("scoring_func", config.scoring_func, f"one of {ROUTER_SCORE_FUNCTIONS}")
    if config.group_score not in ROUTER_GROUP_SCORES:
        fail("group_score", config.group_score, f"one of {ROUTER_GROUP_SCORES}")
    if config.router_aux_loss_type not in ROUTER_AUX_LOSS_TYPES:
        fail("router_aux_loss_type", config.router_aux_loss_type, f"one of {ROUTER_AUX_LOSS_TYPES}")
    for field in ("routed_scaling_factor", "capacity_factor", "eval_capacity_factor"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            fail(field, value, "a positive finite number")
    rate = config.expert_bias_update_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < float("inf"):
        fail("expert_bias_update_rate", rate, "a finite number >= 0")
    for field in ("min_capacity", "hash_seed"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            fail(field, value, "an integer >= 0")
    if not is_finite_number(config.router_jitter_noise) or not 0.0 <= config.router_jitter_noise < 1.0:
        fail("router_jitter_noise", config.router_jitter_noise, "a number in [0, 1)")
    if not is_finite_number(config.fake_gate_noise) or not 0.0 <= config.fake_gate_noise <= 1.0:
        fail("fake_gate_noise", config.fake_gate_noise, "a number in [0, 1]")

    learned_token_choice = config.router_type in LEARNED_TOKEN_CHOICE_ROUTERS
    if config.router_type == "switch" and config.num_experts_per_tok != 1:
        fail("num_experts_per_tok", config.num_experts_per_tok, "1 with router_type='switch' (top-1 routing)")
    if config.topk_before_softmax and (config.scoring_func != "softmax" or not learned_token_choice):
        fail("topk_before_softmax", True,
             "False unless scoring_func='softmax' and router_type is 'topk' or 'switch'")
    if (config.n_group is None) != (config.topk_group is None):
        fail("n_group" if config.n_group is None else "topk_group", None,
             "set together with " + ("topk_group" if config.n_group is None else "n_group"))
    if config.n_group is None and config.group_score != "top2_sum":
        fail("group_score", config.group_score, "'top2_sum' (the default) unless n_group is set")
    if config.n_group is not None:
        for field in ("n_group", "topk_group"):
            value = getattr(config, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(field, value, "a positive integer or None")
        if config.router_type != "topk" or config.topk_before_softmax:
            fail("n_group", config.n_group, "None unless router_type='topk' and topk_before_softmax=False")
        if config.num_experts % config.n_group != 0:
            fail("n_group", config.n_group, f"a divisor of num_experts={config.num_experts}")
        if config.topk_group > config.n_group:
            fail("topk_group", config.topk_group, f"at most n_group={config.n_group}")
        reachable = config.topk_group * (config.num_experts // config.n_group)
        if config.num_experts_per_tok > reachable:
            fail("topk_group", config.topk_group,
                 f"enough groups to hold num_experts_per_tok={config.num_experts_per_tok} experts "
                 f"(topk_group·num_experts/n_group = {reachable})")
    if config.router_type in ("hash", "fake_balanced"):
        for field in ("router_gumbel_noise", "router_jitter_noise"):
            if getattr(config, field):
                fail(field, getattr(config, field), f"off: router_type={config.router_type!r} has no learned router")
    if config.drop_tokens and config.router_type == "expert_choice":
        fail("drop_tokens", True, "False with router_type='expert_choice' (it always fills each expert to "
             "capacity; set capacity_factor instead)")
    if config.renormalize_after_drop and not config.drop_tokens:
        fail("renormalize_after_drop", True, "False unless drop_tokens=True (only dropping leaves a token fewer "
             "slots to renormalise)")
    if config.use_rts and not config.drop_tokens:
        fail("use_rts", True, "False unless drop_tokens=True (random token selection decides what to drop)")
    if config.use_expert_bias and not learned_token_choice:
        fail("use_expert_bias", True, "False unless router_type is 'topk' or 'switch'")
    validate_product_key(config, fail)


def validate_product_key(config: Any, fail: Fail) -> None:
    """The product-key fields: defaults unless `router_type="product_key"`; with it, N² experts and only the
    routing options the product-key router implements."""
    heads = config.product_key_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        fail("product_key_heads", heads, "a positive integer")
    if config.product_key_query_norm not in PRODUCT_KEY_QUERY_NORMS:
        fail("product_key_query_norm", config.product_key_query_norm, f"one of {PRODUCT_KEY_QUERY_NORMS}")
    if config.router_type != "product_key":
        if heads != 1 or config.product_key_query_norm != "layer_norm":
            field = "product_key_heads" if heads != 1 else "product_key_query_norm"
            fail(field, getattr(config, field), "its default unless router_type='product_key'")
        return
    keys = math.isqrt(config.num_experts)
    if keys * keys != config.num_experts:
        fail("num_experts", config.num_experts, "a perfect square N² with router_type='product_key' "
             f"(e.g. {keys * keys} or {(keys + 1) ** 2})")
    for field, allowed in (("scoring_func", "softmax"), ("router_aux_loss_type", ("switch", "none")),
                           ("drop_tokens", False), ("router_gumbel_noise", False)):
        value = getattr(config, field)
        if value != allowed and not (isinstance(allowed, tuple) and value in allowed):
            fail(field, value, f"{allowed!r} with router_type='product_key'")


def validate_norms(config: Any, fail: Fail) -> None:
    """Where the layer's RMSNorms sit (`norm_placement`) and what q/k norm normalises, and when (`qk_norm_scope`,
    `qk_norm_order`)."""
    if config.norm_placement not in NORM_PLACEMENTS:
        fail("norm_placement", config.norm_placement, f"one of {NORM_PLACEMENTS}")
    if config.qk_norm_scope not in QK_NORM_SCOPES:
        fail("qk_norm_scope", config.qk_norm_scope, f"one of {QK_NORM_SCOPES}")
    if config.qk_norm_scope != "head" and not config.qk_norm:
        fail("qk_norm_scope", config.qk_norm_scope, "'head' (the default) unless qk_norm=True")
    if config.qk_norm_order not in QK_NORM_ORDERS:
        fail("qk_norm_order", config.qk_norm_order, f"one of {QK_NORM_ORDERS}")
    if config.qk_norm_order == "after_rope" and (not config.qk_norm or config.qk_norm_scope != "head"):
        fail("qk_norm_order", config.qk_norm_order, "'before_rope' (the default) unless qk_norm=True with "
             "qk_norm_scope='head'")
    if config.qk_norm_order == "after_rope" and config.rope_interleave:
        # RoPE on adjacent pairs leaves a head's dimensions regrouped as halves, which a norm weight would not fit.
        fail("qk_norm_order", config.qk_norm_order, "'before_rope' with rope_interleave=True")


def validate_layer_types(config: Any, fail: Fail) -> None:
    """`layer_types`: None, or one known attention type per layer; sliding layers need a `sliding_window`."""
    types = config.layer_types
    if types is None:
        return
    if not isinstance(types, (list, tuple)) or len(types) != config.num_hidden_layers:
        fail("layer_types", types, f"None or a list of num_hidden_layers={config.num_hidden_layers} attention types "
             f"(each one of {ATTENTION_LAYER_TYPES})")
    bad = [t for t in types if t not in ATTENTION_LAYER_TYPES]
    if bad:
        fail("layer_types", types, f"one of {ATTENTION_LAYER_TYPES} per layer (bad: {bad[0]!r})")
    if "sliding_attention" in types and config.sliding_window is None:
        fail("layer_types", types, "no 'sliding_attention' layer unless sliding_window is set")


LATENT_DIMS = ("q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
"""The widths that only multi-head latent attention has (besides `kv_lora_rank`, which selects it)."""


def validate_mla(config: Any, fail: Fail) -> None:
    """The multi-head latent attention fields of `config` (whose integer fields were already checked): none set
    without `kv_lora_rank`, all widths set with it, and the rest of the attention consistent with it, Llama 4's
    query temperature (`rope_parameters["llama_4_scaling_beta"]`) included, which only MLA reads."""
    rope = config.rope_parameters or {}
    if config.kv_lora_rank is None:
        for field in LATENT_DIMS:
            if getattr(config, field):
                fail(field, getattr(config, field), "unset unless kv_lora_rank is set (multi-head latent attention)")
        if "llama_4_scaling_beta" in rope:
            fail("rope_parameters['llama_4_scaling_beta']", rope["llama_4_scaling_beta"],
                 "unset unless kv_lora_rank is set (only multi-head latent attention reads it)")
        return
    if "llama_4_scaling_beta" in rope:
        beta, original = rope["llama_4_scaling_beta"], rope.get("original_max_position_embeddings")
        if not is_finite_number(beta):
            fail("rope_parameters['llama_4_scaling_beta']", beta, "a finite number")
        if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
            fail("rope_parameters['original_max_position_embeddings']", original,
                 "a positive integer with llama_4_scaling_beta (the context past which the queries are scaled)")
    for field in LATENT_DIMS[1:]:
        if getattr(config, field) is None:
            fail(field, None, "a positive integer when kv_lora_rank is set (multi-head latent attention)")
    if config.qk_rope_head_dim % 2:
        fail("qk_rope_head_dim", config.qk_rope_head_dim, "an even number (RoPE rotates pairs)")
    if config.head_dim != config.qk_rope_head_dim:
        fail("head_dim", config.head_dim, f"None or qk_rope_head_dim={config.qk_rope_head_dim} with multi-head latent "
             "attention (it is the rotary width)")
    if config.num_key_value_heads != config.num_attention_heads:
        fail("num_key_value_heads", config.num_key_value_heads, f"num_attention_heads={config.num_attention_heads} "
             "with multi-head latent attention (every head expands its own keys and values from the latent)")
    for field in ("qkv_bias", "qk_norm", "sliding_window", "attention_sinks"):
        if getattr(config, field):
            fail(field, getattr(config, field), "off with multi-head latent attention (kv_lora_rank set)")
    if config.attention_multiplier is not None:
        fail("attention_multiplier", config.attention_multiplier, "None with multi-head latent attention (its "
             "softmax scale is the query/key width's inverse square root times YaRN's mscale)")
    factor = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if factor != 1.0:
        fail("rope_parameters['partial_rotary_factor']", factor,
             "1.0 with multi-head latent attention (qk_rope_head_dim is the rotated width)")


SPARSE_ATTENTION_DIMS = ("index_topk", "index_n_heads", "index_head_dim")
"""The sizes of DeepSeek sparse attention's lightning indexer (`hf_moe.sparse_attention`), set together."""


def validate_sparse_attention(config: Any, fail: Fail) -> None:
    """The DeepSeek sparse attention fields of `config` (whose multi-head latent attention fields were checked): all
    unset, or all positive integers on multi-head latent attention with a query latent, the indexer's head at least
    as wide as the RoPE part it rotates."""
    if not isinstance(config.indexer_rope_interleave, bool):
        fail("indexer_rope_interleave", config.indexer_rope_interleave, "True or False")
    if config.index_topk is None:
        for field in (*SPARSE_ATTENTION_DIMS[1:], "indexer_rope_interleave"):
            if getattr(config, field):
                fail(field, getattr(config, field), "unset unless index_topk is set (DeepSeek sparse attention)")
        return
    for field in SPARSE_ATTENTION_DIMS:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(field, value, "a positive integer with DeepSeek sparse attention (index_topk set)")
    if config.kv_lora_rank is None or config.q_lora_rank is None:
        field = "kv_lora_rank" if config.kv_lora_rank is None else "q_lora_rank"
        fail(field, None, "a positive integer with index_topk set: the indexer ranks keys for multi-head latent "
             "attention and projects its queries from the query latent")
    if config.index_head_dim < config.qk_rope_head_dim:
        fail("index_head_dim", config.index_head_dim,
             f"at least qk_rope_head_dim={config.qk_rope_head_dim} (RoPE rotates that many of its dimensions)")
