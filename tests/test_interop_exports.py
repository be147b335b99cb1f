"""Exports of hf-moe models (not imported from a family) to the families whose features they use, one test per
family: `--to auto` picks the family and transformers' class computes the model's logits from the export, and each
feature the family lacks is refused by name. The model is a random `tiny_config` one (`conftest.py`)."""

import pytest

from conversions import convert
from hf_moe import HfMoeForCausalLM
from hf_moe.interop import InteropError

from .conftest import assert_rel_close, tiny_config
from .interop_cases import batch, load_foreign, logits, randomize


def export_by_auto(tmp_path, settings: dict, family: str, named: str | None):
    """A random hf-moe model of `tiny_config(**settings)`, saved. With `named`, converting it to `family` is refused
    naming that and None is returned; else `--to auto` picks `family` and the export, loaded by transformers' class,
    computes the model's logits: returns the export."""
    model = HfMoeForCausalLM(tiny_config(**settings)).eval()
    randomize(model)
    model.save_pretrained(tmp_path / "model")
    if named is not None:
        with pytest.raises(InteropError, match=named):
            convert(tmp_path / "model", tmp_path / "out", to=family, progress=False)
        return None
    assert convert(tmp_path / "model", tmp_path / "out", to="auto", progress=False).target_type == family
    exported = load_foreign(tmp_path / "out")
    ids, mask = batch()
    assert_rel_close(logits(exported, ids, mask), logits(model, ids, mask), 1e-5, f"hf_moe → {family}")
    return exported


@pytest.mark.parametrize("overrides,named", [
    ({}, None),
    (dict(group_score="top2_sum"), "group_score='top2_sum'"),
    (dict(rope_interleave=False), "rope_interleave=False"),
    (dict(norm_topk_prob=True), "norm_topk_prob=True"),
    (dict(use_expert_bias=True), "use_expert_bias=True"),
    (dict(moe_layers=[0]), r"moe_layers=\[0\]"),
])
def test_deepseek_v2_exports_softmax_mla_models_and_refuses_the_rest(tmp_path, overrides, named):
    """An hf-moe model with MLA, softmax scores, group-limited routing by each group's best expert and no
    renormalisation goes to deepseek_v2 (`--to auto` too) with its logits; what DeepSeek-V2 lacks is refused."""
    exported = export_by_auto(tmp_path, {**dict(num_key_value_heads=4, kv_lora_rank=10, qk_nope_head_dim=8,
                                                qk_rope_head_dim=4, v_head_dim=6, rope_interleave=True,
                                                norm_topk_prob=False, num_shared_experts=1, n_group=2, topk_group=1,
                                                group_score="max", routed_scaling_factor=2.0), **overrides},
                              "deepseek_v2", named)
    assert exported is None or exported.config.topk_method == "group_limited_greedy"


@pytest.mark.parametrize("overrides,named", [
    ({}, None),
    (dict(rope_interleave=False), "rope_interleave=False"),
    (dict(use_expert_bias=False), "use_expert_bias=False"),
    (dict(moe_layers=[0, 1, 3]), r"moe_layers=\[0, 1, 3\]"),
    (dict(shared_expert_gate=True), "shared_expert_gate=True"),
    (dict(qkv_bias=True), "qkv_bias=True"),
])
def test_ernie_exports_interleaved_rope_models_with_any_layer_interval(tmp_path, overrides, named):
    """An hf-moe model with RoPE on adjacent pairs, an expert bias on softmax scores and ungated shared experts in
    every other layer goes to ernie4_5_moe (`--to auto` too) with its logits; what ERNIE-4.5 lacks is refused."""
    exported = export_by_auto(tmp_path, {**dict(num_hidden_layers=4, moe_layers=[1, 3], rope_interleave=True,
                                                use_expert_bias=True, num_shared_experts=2, moe_intermediate_size=16),
                                         **overrides}, "ernie4_5_moe", named)
    assert exported is None or (exported.config.moe_layer_start_index, exported.config.moe_layer_interval) == (1, 2)


@pytest.mark.parametrize("overrides,named", [
    ({}, None),
    (dict(qk_norm_order="before_rope"), "qk_norm_order='before_rope'"),
    (dict(moe_layers=[1]), r"moe_layers=\[1\]"),
    (dict(moe_intermediate_size=16), "moe_intermediate_size=16"),
    (dict(shared_expert_gate=True), "shared_expert_gate=True"),
])
def test_hunyuan_exports_models_normalising_q_and_k_after_rope(tmp_path, overrides, named):
    """An hf-moe model with q/k norm after RoPE, every layer MoE and one ungated shared expert as wide as the routed
    ones goes to hunyuan_v1_moe (`--to auto` too) with its logits; what Hunyuan-MoE lacks is refused."""
    export_by_auto(tmp_path, {**dict(qk_norm=True, qk_norm_order="after_rope", moe_intermediate_size=64,
                                     num_shared_experts=1, shared_expert_intermediate_size=64), **overrides},
                   "hunyuan_v1_moe", named)


@pytest.mark.parametrize("overrides,named", [
    ({}, None),
    (dict(qk_norm_order="after_rope"), "qk_norm_order='after_rope'"),
    (dict(norm_topk_prob=False), "norm_topk_prob=False"),
    (dict(shared_expert_gate=True), "shared_expert_gate=True"),
    (dict(n_group=2, topk_group=1), "n_group=2"),
])
def test_hy_v3_exports_sigmoid_models_with_any_moe_layers(tmp_path, overrides, named):
    """An hf-moe model with per-head q/k norm, sigmoid scores with an expert bias, renormalised and scaled, and
    ungated shared experts in any layers goes to hy_v3 (`--to auto` too) with its logits; what Hy3 lacks is
    refused."""
    exported = export_by_auto(tmp_path, {**dict(num_hidden_layers=3, moe_layers=[0, 2], qk_norm=True,
                                                scoring_func="sigmoid", use_expert_bias=True, norm_topk_prob=True,
                                                routed_scaling_factor=2.0, num_shared_experts=1,
                                                moe_intermediate_size=16), **overrides}, "hy_v3", named)
    assert exported is None or exported.config.mlp_layer_types == ["sparse", "dense", "sparse"]


MISTRAL4_LIKE = dict(num_key_value_heads=4, kv_lora_rank=10, qk_nope_head_dim=12, qk_rope_head_dim=4, v_head_dim=6,
                     rope_interleave=True, first_k_dense=1, num_shared_experts=1, moe_intermediate_size=16,
                     rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                      "llama_4_scaling_beta": 0.1, "original_max_position_embeddings": 4})


@pytest.mark.parametrize("overrides,named", [
    ({}, None),
    (dict(group_score="max"), "group_score='max'"),
    (dict(use_expert_bias=True), "use_expert_bias=True"),
    (dict(first_k_dense=0, moe_layers=[0]), r"moe_layers=\[0\]"),
    (dict(qk_nope_head_dim=45), r"partial_rotary_factor'\]=0.0816"),  # int(49 · 4/49) = 3 dims would rotate
])
def test_mistral4_exports_softmax_mla_models_with_groups_ranked_by_two_experts(tmp_path, overrides, named):
    """An hf-moe model with MLA, Llama 4's query temperature, softmax scores renormalised in group-limited routing
    (a group ranked by its two best experts) and shared experts after a dense layer goes to mistral4 (`--to auto`
    too) with its logits; what Mistral 4 lacks is refused."""
    export_by_auto(tmp_path, {**MISTRAL4_LIKE, **dict(n_group=2, topk_group=1, norm_topk_prob=True,
                                                       routed_scaling_factor=2.0), **overrides}, "mistral4", named)


def test_llama_4_query_temperature_exports_only_to_mistral4(tmp_path):
    """DeepSeek-V2 expresses a softmax MLA model without groups or renormalisation, but its class does not scale the
    queries: with `llama_4_scaling_beta` the export is refused and `auto` picks mistral4; without, `auto` keeps
    deepseek_v2 (registered first)."""
    settings = {**MISTRAL4_LIKE, "norm_topk_prob": False}
    export_by_auto(tmp_path / "v2", settings, "deepseek_v2", r"rope_parameters=\{.*'llama_4_scaling_beta': 0.1")
    export_by_auto(tmp_path / "m4", settings, "mistral4", None)
    yarn = {k: v for k, v in settings["rope_parameters"].items() if k != "llama_4_scaling_beta"}
    export_by_auto(tmp_path / "plain", {**settings, "rope_parameters": yarn}, "deepseek_v2", None)


@pytest.mark.parametrize("family,layer_types,named", [
    ("qwen2_moe", ["sliding_attention", "full_attention", "sliding_attention"], None),  # the even layers slide
    ("qwen2_moe", ["full_attention", "sliding_attention", "full_attention"], r"layer_types=\['full_attention'"),
    ("qwen2_moe", None, r"layer_types=\['sliding_attention', 'sliding_attention', 'sliding_attention'\]"),
    ("dots1", ["full_attention", "sliding_attention", "sliding_attention"], None),  # the last layers slide
    ("dots1", None, None),
    ("dots1", ["sliding_attention", "full_attention", "sliding_attention"], r"layer_types=\['sliding_attention'"),
])
def test_mixed_attention_layers_export_where_the_family_s_max_window_layers_gives_them(tmp_path, family, layer_types,
                                                                                       named):
    """Qwen2-MoE slides on its even layers below `max_window_layers`, Dots1 on its layers from `max_window_layers`
    on: a model whose sliding layers are those exports (`--to auto` too) with its logits, the others are refused."""
    settings = dict(num_hidden_layers=3, sliding_window=4, layer_types=layer_types)
    if family == "qwen2_moe":
        settings.update(num_shared_experts=1, shared_expert_gate=True, qkv_bias=True)
    else:
        settings.update(first_k_dense=1, scoring_func="sigmoid", use_expert_bias=True, n_group=3, topk_group=2,
                        num_shared_experts=1, qk_norm=True, attention_bias=True, routed_scaling_factor=2.0)
    exported = export_by_auto(tmp_path, settings, family, named)
    if exported is not None:
        assert exported.config.layer_types == tiny_config(**settings).attention_layer_types
