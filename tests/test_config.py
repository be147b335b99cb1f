"""Config validation: every bad field raises an error naming the field, the value and what is allowed."""

import pytest

from hf_moe import HfMoeConfig

from .conftest import tiny_config

BAD_FIELDS = [
    (dict(num_experts_per_tok=7, num_experts=6), "num_experts_per_tok", "at most num_experts"),
    (dict(num_attention_heads=5), "num_attention_heads", "divisor of hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads", "divisor of num_attention_heads"),
    (dict(hidden_size=-32), "hidden_size", "positive integer"),
    (dict(intermediate_size=0), "intermediate_size", "positive integer"),
    (dict(moe_intermediate_size=-1), "moe_intermediate_size", "positive integer"),
    (dict(num_experts=0), "num_experts", "positive integer"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers", "positive integer"),
    (dict(hidden_act="swishy"), "hidden_act", "activations"),
    (dict(first_k_dense=-1), "first_k_dense", "integer >= 0"),
    (dict(first_k_dense=9), "first_k_dense", "at most num_hidden_layers"),
    (dict(moe_layer_freq=0), "moe_layer_freq", "positive integer"),
    (dict(moe_layers=[0, 5]), "moe_layers", "distinct layer indices"),
    (dict(moe_layers=[1, 1]), "moe_layers", "distinct layer indices"),
    (dict(num_shared_experts=-2), "num_shared_experts", "integer >= 0"),
    (dict(shared_expert_gate=True), "shared_expert_gate", "no shared expert"),
    (dict(sliding_window=0), "sliding_window", "positive integer or None"),
    (dict(head_dim=-8), "head_dim", "positive integer or None"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps", "positive finite number"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef", ">= 0"),
    (dict(router_z_loss_coef=-1), "router_z_loss_coef", ">= 0"),
    (dict(attention_dropout=1.5), "attention_dropout", "probability"),
    (dict(rope_parameters={"rope_type": "warp", "rope_theta": 1e4}), "rope_type", "'default' or one of"),
    # non-finite floats (a NaN coefficient makes the loss NaN), strings as numbers, bools as ints or numbers
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps", "positive finite number"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps", "positive finite number"),
    (dict(initializer_range=float("nan")), "initializer_range", "positive finite number"),
    (dict(initializer_range=float("inf")), "initializer_range", "positive finite number"),
    (dict(router_aux_loss_coef=float("nan")), "router_aux_loss_coef", "finite number >= 0"),
    (dict(router_aux_loss_coef=float("inf")), "router_aux_loss_coef", "finite number >= 0"),
    (dict(router_z_loss_coef=float("nan")), "router_z_loss_coef", "finite number >= 0"),
    (dict(router_z_loss_coef=float("inf")), "router_z_loss_coef", "finite number >= 0"),
    (dict(router_z_loss_coef=True), "router_z_loss_coef", "finite number >= 0"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps", "positive finite number"),
    (dict(attention_dropout="0.1"), "attention_dropout", "probability"),
    (dict(attention_dropout=float("nan")), "attention_dropout", "probability"),
    (dict(attention_dropout=False), "attention_dropout", "probability"),
    (dict(moe_layers=5), "moe_layers", "list of distinct layer indices"),
    (dict(moe_layers="01"), "moe_layers", "list of distinct layer indices"),
    (dict(moe_layers=[True]), "moe_layers", "distinct layer indices"),
    (dict(moe_layers=[1.0]), "moe_layers", "distinct layer indices"),
    (dict(router_jitter_noise=False), "router_jitter_noise", "[0, 1)"),
    (dict(fake_gate_noise=float("nan")), "fake_gate_noise", "[0, 1]"),
    (dict(fake_gate_noise=True), "fake_gate_noise", "[0, 1]"),
    (dict(num_key_value_heads=True), "num_key_value_heads", "positive integer"),
    (dict(hidden_act=["silu"]), "hidden_act", "activations"),
    (dict(use_cache=1), "use_cache", "True or False"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings", "True or False"),
    (dict(attention_bias=1), "attention_bias", "True or False"),
    (dict(qkv_bias=0), "qkv_bias", "True or False"),
    (dict(qk_norm="True"), "qk_norm", "True or False"),
    (dict(qk_norm_scope="heads", qk_norm=True), "qk_norm_scope", "one of"),
    (dict(qk_norm_scope="projection"), "qk_norm_scope", "unless qk_norm=True"),
    (dict(qk_norm_order="after"), "qk_norm_order", "one of"),
    (dict(qk_norm_order="after_rope"), "qk_norm_order", "unless qk_norm=True"),
    (dict(qk_norm_order="after_rope", qk_norm=True, qk_norm_scope="projection"), "qk_norm_order",
     "qk_norm_scope='head'"),
    (dict(qk_norm_order="after_rope", qk_norm=True, rope_interleave=True), "qk_norm_order", "rope_interleave=True"),
    (dict(embedding_multiplier=0.0), "embedding_multiplier", "positive finite number"),
    (dict(residual_multiplier="0.22"), "residual_multiplier", "positive finite number"),
    (dict(logits_scaling=float("inf")), "logits_scaling", "positive finite number"),
    (dict(attention_multiplier=-0.125), "attention_multiplier", "positive finite number or None"),
    (dict(attention_multiplier=0.125, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
          num_key_value_heads=4),
     "attention_multiplier", "None with multi-head latent attention"),
    (dict(norm_placement="sandwich"), "norm_placement", "one of ('pre', 'post')"),
    (dict(shared_expert_gate=1, num_shared_experts=1), "shared_expert_gate", "True or False"),
    (dict(output_router_logits=1), "output_router_logits", "True or False"),
    (dict(rope_parameters="linear"), "rope_parameters", "None or a dict"),
    (dict(layer_types=["full_attention"]), "layer_types", "list of num_hidden_layers=2 attention types"),
    (dict(layer_types=["full_attention", "chunked_attention"], sliding_window=4), "layer_types",
     "(bad: 'chunked_attention')"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types", "unless sliding_window is set"),
    (dict(layer_types="sliding_attention", sliding_window=4), "layer_types", "list of attention types"),
    (dict(attention_sinks=1), "attention_sinks", "True or False"),
    (dict(attention_sinks=True, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
          num_key_value_heads=4),
     "attention_sinks", "off with multi-head latent attention"),
]


@pytest.mark.parametrize("overrides,field,expected", BAD_FIELDS,
                         ids=[f"{b[1]}={next(iter(b[0].values()))!r}" for b in BAD_FIELDS])
def test_bad_field_is_refused_with_a_clear_error(overrides, field, expected):
    with pytest.raises(ValueError) as info:
        tiny_config(**overrides)
    message = str(info.value)
    assert field in message and expected in message
    assert repr(next(iter(overrides.values())))[:3] in message or field == "rope_type"


@pytest.mark.parametrize("factor,expected", [(1.5, "(0, 1]"), (0.0, "(0, 1]"), ("half", "(0, 1]"),
                                             (0.375, "even number")])  # head_dim 8 · 0.375 = 3 cannot pair up
def test_partial_rotary_factor_is_validated(factor, expected):
    with pytest.raises(ValueError, match=r"partial_rotary_factor'\]=" + repr(factor)[:3]) as info:
        tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": factor})
    assert expected in str(info.value)


def test_layer_types_default_to_today_s_sliding_window_rule():
    assert tiny_config().attention_layer_types == ["full_attention"] * 2
    assert tiny_config(sliding_window=4).attention_layer_types == ["sliding_attention"] * 2
    mixed = ["full_attention", "sliding_attention"]
    assert tiny_config(sliding_window=4, layer_types=mixed).attention_layer_types == mixed


def test_moe_layer_selection():
    assert tiny_config(num_hidden_layers=6).moe_layer_indices == [0, 1, 2, 3, 4, 5]
    assert tiny_config(num_hidden_layers=6, first_k_dense=1, moe_layer_freq=2).moe_layer_indices == [1, 3, 5]
    assert tiny_config(num_hidden_layers=6, moe_layers=[4, 2]).moe_layer_indices == [2, 4]


def test_defaults_and_round_trip(tmp_path):
    cfg = tiny_config(num_key_value_heads=None, moe_intermediate_size=None, num_shared_experts=2)
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    assert cfg.moe_intermediate_size == cfg.intermediate_size
    assert cfg.shared_expert_size == 2 * cfg.intermediate_size
    cfg.save_pretrained(tmp_path)
    loaded = HfMoeConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == cfg.to_dict()


def test_rope_scaling_types_are_accepted():
    cfg = tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    assert cfg.rope_parameters["rope_type"] == "linear"


def test_integers_for_float_fields_and_tuples_for_moe_layers_stay_accepted():
    cfg = tiny_config(rms_norm_eps=1, router_aux_loss_coef=0, attention_dropout=0, moe_layers=(1,))
    assert cfg.moe_layer_indices == [1]


def test_head_dim_is_resolved_like_llama():
    from transformers import LlamaConfig

    for hidden_size, heads in ((64, 4), (96, 3), (32, 2)):
        cfg = tiny_config(hidden_size=hidden_size, num_attention_heads=heads, num_key_value_heads=heads, head_dim=None)
        reference = LlamaConfig(hidden_size=hidden_size, num_attention_heads=heads, head_dim=None)
        assert cfg.head_dim == reference.head_dim
    assert tiny_config(head_dim=24).head_dim == 24
