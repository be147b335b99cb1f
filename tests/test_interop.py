"""Foreign MoE checkpoints (mixtral, qwen2_moe, qwen3_moe, olmoe, glm4_moe, deepseek_v3, dots1, solar_open,
glm4_moe_lite, minimax_m2, deepseek_v2, ernie4_5_moe, hunyuan_v1_moe, hy_v3, mistral4, deepseek_v32, glm_moe_dsa,
granitemoe, granitemoeshared, flex_olmo) in and out, against transformers' own classes: tiny random models built and
saved by transformers (the cases are in `interop_cases.py`), every weight and buffer randomised so that a wrong mapping
shows; direct loading, expert-parallel loading, conversion both ways and every refusal. DeepSeek-V2 has two cases:
group-limited greedy with a q latent and YaRN, and V2-Lite's plain q_proj with greedy routing (which ignores the
groups its config names); DeepSeek-V3.2 two: an indexer that keeps 4 of the test sequences' 11 keys per query, and one
that keeps them all."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conversions import convert
from conversions.cli import main as cli_main
from hf_moe import HfMoeForCausalLM
from hf_moe.interop import InteropError

from .conftest import assert_cached_greedy_equals_full_forward, assert_rel_close, tiny_config
from .interop_cases import BASE, FAMILIES, batch, build, edit_config, load_foreign, logits, tensors

WORKER = os.path.join(os.path.dirname(__file__), "interop_worker.py")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """test case → (folder, transformers model), built once for the module."""
    root = tmp_path_factory.mktemp("foreign")
    return {name: (root / name, build(name, root / name)) for name in FAMILIES}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_direct_load_computes_what_transformers_computes(saved, model_type):
    folder, reference = saved[model_type]
    model = HfMoeForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "hf_moe" and not model.training
    ids, mask = batch()
    assert_rel_close(logits(model, ids, mask), logits(reference, ids, mask), 1e-5, f"{model_type} logits")
    prompt = ids[1:, :6]
    ours = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    theirs = reference.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(ours, theirs), f"{model_type}: greedy generation differs"
    assert_cached_greedy_equals_full_forward(model, prompt, 5)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "minimax_m2"])
def test_fused_expert_tensors_load_like_per_expert_ones(saved, tmp_path, model_type):
    """transformers 5's in-memory layout (`mlp.experts.gate_up_proj [E, 2I, H]`, Mixtral's and MiniMax-M2's `mlp`
    included, with MiniMax-M2's expert bias on the block) saved as is loads the same model."""
    folder, reference = saved[model_type]
    shutil.copytree(folder, tmp_path / "fused")
    os.remove(tmp_path / "fused" / "model.safetensors")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    with safe_open(tmp_path / "fused" / "model.safetensors", "pt") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in f.keys()  # noqa: SIM118
    ids, _ = batch()
    assert_rel_close(logits(HfMoeForCausalLM.from_pretrained(tmp_path / "fused"), ids), logits(reference, ids), 1e-5)


def test_a_family_saved_fused_imports_per_expert_tensors_too(saved, tmp_path):
    """Mistral 4's class saves its experts fused (`MoeFamily.fused_experts`); the same experts split into the
    per-expert layout (`experts.{e}.{gate,up,down}_proj.weight`, transformers' other families') load the same model."""
    folder, reference = saved["mistral4"]
    split = {}
    for name, value in tensors(folder).items():
        experts = name.rsplit(".", 1)[0]
        if name.endswith(".experts.gate_up_proj"):
            for e, (gate, up) in enumerate(zip(*value.chunk(2, dim=1), strict=True)):
                split[f"{experts}.{e}.gate_proj.weight"] = gate.clone()
                split[f"{experts}.{e}.up_proj.weight"] = up.clone()
        elif name.endswith(".experts.down_proj"):
            split.update({f"{experts}.{e}.down_proj.weight": down.clone() for e, down in enumerate(value)})
        else:
            split[name] = value
    assert any(".experts.0.gate_proj.weight" in name for name in split)
    shutil.copytree(folder, tmp_path / "per_expert")
    save_file(split, tmp_path / "per_expert" / "model.safetensors")
    ids, mask = batch()
    model = HfMoeForCausalLM.from_pretrained(tmp_path / "per_expert")
    assert_rel_close(logits(model, ids, mask), logits(reference, ids, mask), 1e-5, "mistral4 per expert")


def test_expert_parallel_load_of_foreign_checkpoints_equals_one_process(saved, tmp_path):
    """Two gloo ranks, each reading its half of the experts (per-expert and fused tensors), compute the one-process
    logits of every family."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("2 processes need 2 GPUs under NCCL; this machine has fewer")
    (tmp_path / "checkpoints").mkdir()
    for name, (folder, _) in saved.items():
        shutil.copytree(folder, tmp_path / "checkpoints" / name)
    ids = torch.randint(3, BASE["vocab_size"], (4, 9))
    torch.save(ids, tmp_path / "batch.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"ep{r}.pt") for r in range(2)]
    for name, (_, reference) in saved.items():
        expected = logits(reference, ids)
        for r, result in enumerate(ranks):
            assert_rel_close(result["logits"][name], expected[2 * r : 2 * r + 2], 1e-5, f"{name} rank {r}")
            num_experts = getattr(reference.config, "num_experts", None) or reference.config.num_local_experts
            assert set(result["experts"][name].values()) == {num_experts // 2}, "each rank holds half the experts"


@pytest.mark.parametrize("model_type,changes,named", [
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ("qwen3_moe", {"a_field_from_the_future": 3}, "a_field_from_the_future"),
    ("qwen2_moe", {"layer_types": ["sliding_attention", "full_attention", "full_attention"]}, "sliding_window=0"),
    ("dots1", {"layer_types": ["full_attention", "chunked_attention"]}, "layer_types=['full_attention'"),
    ("dots1", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters['partial_rotary_factor']=0.5"),
    ("solar_open", {"first_k_dense_replace": 1}, "first_k_dense_replace=1"),
    ("glm4_moe_lite", {"first_k_dense_replace": 1}, "first_k_dense_replace=1"),
    ("glm4_moe_lite", {"topk_method": "group_limited_greedy"}, "topk_method='group_limited_greedy'"),
    ("minimax_m2", {"rotary_dim": 4}, "rotary_dim=4"),
    ("minimax_m2", {"attn_type_list": [0, 1]}, "attn_type_list=[0, 1]"),
    ("minimax_m2", {"use_routing_bias": False}, "use_routing_bias=False"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob=True"),
    ("deepseek_v2", {"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
    ("deepseek_v2_lite", {"mlp_bias": True}, "mlp_bias=True"),
    ("ernie4_5_moe", {"use_bias": True}, "use_bias=True"),
    ("ernie4_5_moe", {"moe_norm_min": 1e-6}, "moe_norm_min=1e-06"),
    ("hunyuan_v1_moe", {"moe_topk": [2, 1]}, "moe_topk=[2, 1]"),
    ("hunyuan_v1_moe", {"moe_intermediate_size": [16, 16]}, "moe_intermediate_size=[16, 16]"),
    ("hunyuan_v1_moe", {"use_qk_norm": False}, "use_qk_norm=False"),
    ("hunyuan_v1_moe", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "alpha": 1000.0,
                                            "rope_theta": 10000.0}}, "rope_parameters['alpha']=1000.0"),
    ("deepseek_v32", {"indexer_rope_interleave": True}, "indexer_rope_interleave=True"),
    ("deepseek_v32", {"rope_interleave": False}, "rope_interleave=False"),
    ("glm_moe_dsa", {"indexer_rope_interleave": False}, "indexer_rope_interleave=False"),
    ("glm_moe_dsa", {"indexer_types": ["full", "shared", "full"]}, "indexer_types=['full', 'shared', 'full']"),
    ("hy_v3", {"route_norm": False}, "route_norm=False"),
    ("hy_v3", {"first_k_dense_replace": 1}, "first_k_dense_replace=1"),
    ("hy_v3", {"expert_hidden_dim": 32}, "expert_hidden_dim=32"),
    ("hy_v3", {"mlp_bias": True}, "mlp_bias=True"),
    ("mistral4", {"n_shared_experts": 0}, "n_shared_experts=0"),
    ("mistral4", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     "rope_parameters['llama_4_scaling_beta']=None"),
    ("mistral4", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1,
                                      "original_max_position_embeddings": 4}},
     "rope_parameters['rope_type']='default'"),
    ("mistral4", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                      "partial_rotary_factor": 0.5, "llama_4_scaling_beta": 0.1,
                                      "original_max_position_embeddings": 4}},
     "rope_parameters['partial_rotary_factor']=0.5"),
    ("granitemoe", {"mlp_bias": True}, "mlp_bias"),
    ("granitemoeshared", {"residual_multiplier": -0.5}, "residual_multiplier=-0.5"),
    ("flex_olmo", {"clip_qkv": 8.0}, "clip_qkv"),
])
def test_foreign_configs_hf_moe_cannot_express_are_refused(saved, tmp_path, model_type, changes, named):
    edit_config(saved[model_type][0], tmp_path / "edited", **changes)
    with pytest.raises(InteropError, match=named.replace("(", r"\(").replace("[", r"\[")):
        HfMoeForCausalLM.from_pretrained(tmp_path / "edited")


def test_checkpoints_with_missing_or_extra_tensors_are_refused(saved, tmp_path):
    folder, reference = saved["glm4_moe"]
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    for what, state_dict, named in [
        ("missing", {k: v for k, v in state.items() if k != "model.layers.1.mlp.gate.e_score_correction_bias"},
         "lacks"),
        ("extra", {**state, "model.layers.1.mlp.gate.bias": torch.zeros(8)}, "model.layers.1.mlp.gate.bias"),
    ]:
        shutil.copytree(folder, tmp_path / what)
        save_file(state_dict, tmp_path / what / "model.safetensors")
        with pytest.raises(InteropError, match=named):
            HfMoeForCausalLM.from_pretrained(tmp_path / what)


@pytest.mark.parametrize("model_type", ["glm4_moe", "glm4_moe_lite"])
def test_glm_multi_token_prediction_layers_are_ignored_as_transformers_does(saved, tmp_path, model_type):
    folder, reference = saved[model_type]
    shutil.copytree(folder, tmp_path / "mtp")
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    last = reference.config.num_hidden_layers
    tensors[f"model.layers.{last}.eh_proj.weight"] = torch.randn(32, 64)  # the MTP layer after the last one
    save_file(tensors, tmp_path / "mtp" / "model.safetensors")
    ids, _ = batch()
    assert_rel_close(logits(HfMoeForCausalLM.from_pretrained(tmp_path / "mtp"), ids), logits(reference, ids), 1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_convert_both_ways_is_exact(saved, tmp_path, model_type):
    """family → hf_moe → family: AutoModel loads the hf-moe checkpoint with the family's logits, the export is the
    file transformers saved (same names, bit-equal tensors, architectures) and transformers' class loads it; and the
    hf-moe checkpoint round-trips bit-exactly through the family."""
    folder, reference = saved[model_type]
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    ids, mask = batch()
    expected = logits(reference, ids, mask)

    convert(folder, tmp_path / "hf", progress=False, max_shard_size="20KB")
    imported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(imported, HfMoeForCausalLM)
    assert_rel_close(logits(imported, ids, mask), expected, 1e-5, f"{model_type} → hf_moe")
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (tmp_path / "hf" / "generation_config.json").is_file() and (tmp_path / "hf" / "README.md").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1, "max_shard_size shards the output"

    result = convert(tmp_path / "hf", tmp_path / "back", to=reference.config.model_type, progress=False)
    assert result.config.architectures == [type(reference).__name__]
    original, back = tensors(folder), tensors(tmp_path / "back")
    assert sorted(back) == sorted(original), "the export names tensors as transformers saves them"
    assert all(torch.equal(back[k], original[k]) for k in original), "exported tensors are the original bits"
    exported = load_foreign(tmp_path / "back")
    assert type(exported) is type(reference)
    assert_rel_close(logits(exported, ids, mask), expected, 1e-5, f"hf_moe → {model_type}")

    convert(tmp_path / "back", tmp_path / "again", to="hf_moe", progress=False)
    first, second = tensors(tmp_path / "hf"), tensors(tmp_path / "again")
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("model_type,to,named", [
    ("glm4_moe", "qwen3_moe", "scoring_func"),
    ("qwen2_moe", "mixtral", "shared_expert_gate"),
    ("qwen3_moe", "glm4_moe", "scoring_func"),
    ("mixtral", "olmoe", "sliding_window"),
    ("deepseek_v3", "glm4_moe", "kv_lora_rank"),
    ("glm4_moe", "deepseek_v3", "kv_lora_rank"),
    ("glm4_moe", "dots1", "qkv_bias"),
    ("qwen3_moe", "dots1", "scoring_func"),
    ("dots1", "glm4_moe", "attention_bias"),
    ("glm4_moe", "solar_open", "moe_layers"),
    ("glm4_moe_lite", "deepseek_v3", "moe_layers"),
    ("dots1", "glm4_moe_lite", "kv_lora_rank"),
    ("minimax_m2", "mixtral", "qk_norm"),
    ("olmoe", "minimax_m2", "scoring_func"),
    ("glm4_moe", "minimax_m2", "routed_scaling_factor"),
    ("deepseek_v2", "deepseek_v3", "scoring_func"),
    ("deepseek_v3", "deepseek_v2", "scoring_func"),
    ("ernie4_5_moe", "qwen3_moe", "qk_norm"),
    ("ernie4_5_moe", "mixtral", "use_expert_bias"),
    ("qwen3_moe", "ernie4_5_moe", "rope_interleave"),
    ("hunyuan_v1_moe", "qwen3_moe", "qk_norm_order"),
    ("qwen3_moe", "hunyuan_v1_moe", "qk_norm_order"),
    ("deepseek_v32", "deepseek_v3", "index_topk"),
    ("deepseek_v3", "deepseek_v32", "index_topk"),
    ("glm_moe_dsa", "deepseek_v32", "indexer_rope_interleave"),
    ("deepseek_v32", "glm_moe_dsa", "indexer_rope_interleave"),
    ("hy_v3", "hunyuan_v1_moe", "qk_norm_order"),
    ("hy_v3", "glm4_moe", "moe_layers"),
    ("qwen3_moe", "hy_v3", "scoring_func"),
    ("glm4_moe", "hy_v3", "qkv_bias"),
    ("mistral4", "deepseek_v3", "scoring_func"),
    ("deepseek_v3", "mistral4", "scoring_func"),
    ("deepseek_v2", "mistral4", "group_score"),
    ("mistral4", "deepseek_v2", "norm_topk_prob"),
    ("granitemoe", "mixtral", "embedding_multiplier"),
    ("mixtral", "granitemoe", "sliding_window"),
    ("granitemoeshared", "granitemoe", "shared_expert_size"),
    ("olmoe", "flex_olmo", "norm_placement"),
])
def test_exports_a_family_cannot_express_are_refused_and_write_nothing(saved, tmp_path, model_type, to, named):
    with pytest.raises(InteropError, match=rf"{named}=.*Families that express this model exactly: {model_type}"):
        convert(saved[model_type][0], tmp_path / "out", to=to, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_model_two_families_express_exports_to_either(saved, tmp_path):
    """A DeepSeek-V3 model is also a GLM-4-MoE-Lite one (the same latent attention and routing, the dense-then-MoE
    layers named one by one): transformers' Glm4MoeLite class computes its logits from the export, and `auto` keeps
    the family registered first."""
    folder, reference = saved["deepseek_v3"]
    assert convert(folder, tmp_path / "auto", to="auto", progress=False).target_type == "deepseek_v3"
    convert(folder, tmp_path / "lite", to="glm4_moe_lite", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "lite")
    assert type(exported).__name__ == "Glm4MoeLiteForCausalLM"
    ids, mask = batch()
    assert_rel_close(logits(exported, ids, mask), logits(reference, ids, mask), 1e-5, "deepseek_v3 as glm4_moe_lite")


@pytest.mark.parametrize("overrides,named", [
    (dict(drop_tokens=True), "drop_tokens=True"),
    (dict(router_type="expert_choice"), "router_type='expert_choice'"),
    (dict(attention_sinks=True), "attention_sinks=True"),
])
def test_hf_moe_only_settings_are_refused_for_every_family(tmp_path, overrides, named):
    HfMoeForCausalLM(tiny_config(**overrides)).save_pretrained(tmp_path / "model")
    for to in ("mixtral", "qwen3_moe", "auto"):
        if to == "auto":
            assert convert(tmp_path / "model", tmp_path / "auto", to="auto", progress=False).target_type == "hf_moe"
            continue
        with pytest.raises(InteropError, match=named):
            convert(tmp_path / "model", tmp_path / to, to=to, progress=False)
        assert not (tmp_path / to).exists()


def test_hunyuan_per_layer_lists_with_one_value_import(saved, tmp_path):
    """Tencent's config.json gives `moe_topk` (and the fields transformers' class ignores) per layer: equal entries
    import as the one value."""
    folder, reference = saved["hunyuan_v1_moe"]
    edit_config(folder, tmp_path / "lists", moe_topk=[2, 2], num_shared_expert=[1, 1], use_qk_norm=True)
    ids, mask = batch()
    model = HfMoeForCausalLM.from_pretrained(tmp_path / "lists")
    assert_rel_close(logits(model, ids, mask), logits(reference, ids, mask), 1e-5, "hunyuan with per-layer lists")


def test_cli_converts_and_refuses(saved, tmp_path, capsys):
    from conversions.upcycle_types import CONVERT_TARGETS
    from hf_moe.interop import FAMILIES as REGISTERED

    assert CONVERT_TARGETS == ("hf_moe", *REGISTERED, "auto")  # every built-in family is a --to choice, in order
    assert cli_main(["convert", str(saved["dots1"][0]), str(tmp_path / "dots1"), "--to", "dots1", "--no-progress"]) == 0
    folder = saved["mixtral"][0]
    assert cli_main(["convert", str(folder), str(tmp_path / "out"), "--to", "auto", "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    assert cli_main(["convert", str(folder), str(tmp_path / "bad"), "--to", "glm4_moe", "--no-progress"]) == 2
    assert "scoring_func='softmax'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_lora_trained_on_an_imported_model_merges_and_exports(saved, tmp_path):
    """LoRA on attention, dense MLP, shared expert and routed experts of an imported Qwen2-MoE, trained a few steps,
    merged and exported: transformers' Qwen2MoeForCausalLM computes what the adapted model computes."""
    from peft import get_peft_model

    from hf_moe.integrations import lora_config

    folder, reference = saved["qwen2_moe"]
    model = get_peft_model(HfMoeForCausalLM.from_pretrained(folder), lora_config(r=4))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ids = torch.randint(3, BASE["vocab_size"], (2, 10))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    ids, mask = batch()
    adapted = logits(model, ids, mask)
    assert (adapted - logits(reference, ids, mask)).abs().max() > 1e-3, "the adapter changes the model"
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    convert(tmp_path / "merged", tmp_path / "qwen2", to="qwen2_moe", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2")
    assert type(exported) is type(reference)
    assert_rel_close(logits(exported, ids, mask), adapted, 1e-5, "merged LoRA exported to qwen2_moe")


@pytest.mark.parametrize("arch,settings,to", [
    ("qwen3", dict(num_experts=4, top_k=2), "qwen3_moe"),
    ("qwen2", dict(num_experts=4, top_k=2, shared_experts=1, shared_expert_gate=True, moe_layers="0"), "qwen2_moe"),
])
def test_upcycled_models_export_to_a_family(tmp_path, arch, settings, to):
    """An upcycled Qwen3 exports to qwen3_moe (no shared experts), an upcycled Qwen2 with a gated shared expert and a
    dense layer to qwen2_moe; transformers' class computes the upcycled model's logits."""
    from conversions import UpcycleConfig, upcycle

    from .test_upcycle import save_dense

    save_dense(arch, tmp_path / "dense")
    upcycle(tmp_path / "dense", tmp_path / "moe", UpcycleConfig(**settings, progress=False))
    assert convert(tmp_path / "moe", tmp_path / "out", to="auto", progress=False).target_type == to
    ids, mask = batch()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert exported.config.model_type == to
    expected = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "moe"), ids, mask)
    assert_rel_close(logits(exported, ids, mask), expected, 1e-5, f"upcycled {arch} exported to {to}")
