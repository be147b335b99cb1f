"""DeepSeek-V3 in hf-moe, against transformers' own DeepseekV3 classes: multi-head latent attention (q/kv low-rank
projections, rope/nope split, interleaved RoPE, YaRN's softmax scale, the latent KV cache) under eager and sdpa
attention and torch.compile, and DeepSeek-V3's routing (sigmoid scores, group-limited selection, score correction
bias, routed scaling, shared experts, first dense layers)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CompileConfig, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from conversions import convert
from conversions.cli import main as cli_main
from hf_moe import HfMoeConfig, HfMoeForCausalLM, record_routing
from hf_moe.interop import FAMILIES, InteropError, to_hf_moe_config
from hf_moe.mla import HfMoeMultiHeadLatentAttention
from hf_moe.moe.block import HfMoeSparseMoeBlock

from .conftest import assert_cached_greedy_equals_full_forward, assert_rel_close, requires_cuda, tiny_config

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.9,
        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}
ATTENTION_CASES = {
    "q_lora": {},
    "plain_q_proj": {"q_lora_rank": None},
    "halves_rope": {"rope_interleave": False},
    "yarn": {"rope_parameters": YARN},
    "bias": {"attention_bias": True},
}


def deepseek_config(**overrides) -> DeepseekV3Config:
    """A tiny DeepSeek-V3; `rms_norm_eps` differs from the latent norms' fixed 1e-6 so that mixing them up shows. No
    end-of-sequence token: generation runs its full length, so every step is compared."""
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
                  routed_scaling_factor=2.5, kv_lora_rank=12, q_lora_rank=10, qk_rope_head_dim=4, v_head_dim=6,
                  qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_interleave=True, eos_token_id=None)
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def hf_moe_config(config: DeepseekV3Config) -> HfMoeConfig:
    """The HfMoeConfig the deepseek_v3 family maps `config` to."""
    return to_hf_moe_config(FAMILIES["deepseek_v3"], config)


def hf_moe_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek's tensor names → hf-moe's: only the router differs (`gate` → `router`, its bias → `expert_bias`)."""
    renames = {"mlp.gate.weight": "mlp.router.weight", "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias"}
    out = {}
    for name, tensor in state_dict.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


def randomise_router(module: torch.nn.Module) -> None:
    """Decisive router logits and a nonzero score correction bias (transformers initialises the bias to zero)."""
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("gate.weight"):
                tensor.normal_(0.0, 0.3)
            elif name.endswith("e_score_correction_bias"):
                tensor.normal_(0.0, 0.1)


def deepseek_pair(attn_implementation: str = "eager", **overrides) -> tuple[DeepseekV3ForCausalLM, HfMoeForCausalLM]:
    config = deepseek_config(**overrides)
    config._attn_implementation = attn_implementation
    reference = DeepseekV3ForCausalLM(config).eval()
    randomise_router(reference)
    hf_config = hf_moe_config(config)
    hf_config._attn_implementation = attn_implementation
    model = HfMoeForCausalLM(hf_config).eval()
    missing, unexpected = model.load_state_dict(hf_moe_state_dict(reference.state_dict()), strict=False)
    assert unexpected == [] and all(name.endswith("inv_freq") for name in missing), (missing, unexpected)
    return reference, model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_logits_and_cached_greedy_generate_equal_transformers_deepseek_v3(case, attn_implementation):
    reference, model = deepseek_pair(attn_implementation, **ATTENTION_CASES[case])
    assert isinstance(model.model.layers[0].self_attn, HfMoeMultiHeadLatentAttention)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        assert_rel_close(model(ids).logits, reference(ids).logits, 1e-5, "logits")
    want = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
    assert_cached_greedy_equals_full_forward(model, ids, 6)


def test_attention_weights_are_recorded_and_equal_transformers():
    reference, model = deepseek_pair()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        got, want = model(ids, output_attentions=True), reference(ids, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 3
    for g, w in zip(got.attentions, want.attentions):
        assert_rel_close(g, w, 1e-5, "attention weights")


def test_padded_batch_equals_transformers():
    reference, model = deepseek_pair("sdpa")
    ids = torch.randint(2, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    assert_rel_close(got[mask.bool()], want[mask.bool()], 1e-5, "logits of real tokens")


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("groups", [(4, 2), (1, 1), (2, 1)])
def test_moe_block_routes_and_computes_as_deepseek_v3(norm_topk_prob, groups):
    config = deepseek_config(norm_topk_prob=norm_topk_prob, n_group=groups[0], topk_group=groups[1])
    reference = DeepseekV3MoE(config)
    torch.nn.init.normal_(reference.experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(reference.experts.down_proj, std=0.1)
    randomise_router(reference)
    block = HfMoeSparseMoeBlock(hf_moe_config(config), layer_idx=1).eval()
    renamed = {name.removeprefix("mlp."): t for name, t in hf_moe_state_dict(
        {f"mlp.{k}": v for k, v in reference.state_dict().items()}).items()}
    assert block.load_state_dict(renamed, strict=True)
    x = torch.randn(2, 7, config.hidden_size)

    with torch.no_grad():
        _, want_weights, want_index = reference.gate(x)
        with record_routing(block) as routings:
            got = block(x)
        want = reference(x)
    order = want_index.sort(dim=-1)
    got_order = routings[0].top_k_index.sort(dim=-1)
    assert torch.equal(got_order.values, order.values), "selected experts differ"
    assert_rel_close(routings[0].top_k_weights.gather(1, got_order.indices),
                     want_weights.gather(1, order.indices), 1e-6, "combine weights")
    assert_rel_close(got, want, 1e-5, "block output")


def test_first_dense_layers_and_shared_experts_follow_the_config():
    _, model = deepseek_pair()
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["HfMoeMLP", "HfMoeSparseMoeBlock", "HfMoeSparseMoeBlock"]
    assert model.model.layers[1].mlp.shared_experts.gate_proj.out_features == 16


def test_attention_compiles_fullgraph_and_equals_eager_forward_and_backward():
    _, model = deepseek_pair(num_hidden_layers=1, first_k_dense_replace=0)
    attention = model.model.layers[0].self_attn.train()
    x = torch.randn(2, 7, 32)
    position_embeddings = model.model.rotary_emb(x, torch.arange(7)[None])
    compiled = torch.compile(copy.deepcopy(attention), fullgraph=True)
    torch._dynamo.reset()
    outputs = []
    for module in (compiled, attention):
        inp = x.clone().requires_grad_(True)
        out = module(inp, position_embeddings, None)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append((out.detach(), inp.grad, *(p.grad for p in module.parameters())))
    for got, want in zip(*outputs):
        assert_rel_close(got, want, 1e-5, "compiled vs eager")


def test_compiled_static_cache_generate_equals_dynamic_cache():
    _, model = deepseek_pair("sdpa", num_hidden_layers=1, first_k_dense_replace=0)
    ids = torch.randint(0, 97, (2, 6))
    dynamic = model.generate(ids, max_new_tokens=4, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles generation on accelerators only by default
    torch._dynamo.reset()
    static = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static",
                            compile_config=compile_config)
    assert "_compiled_call" in model.__dict__, "generate did not compile the forward"
    assert torch.equal(static, dynamic)


def test_mla_model_saves_and_loads_back(tmp_path):
    _, model = deepseek_pair()
    model.save_pretrained(tmp_path)
    loaded = HfMoeForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.kv_lora_rank == 12 and loaded.config.head_dim == 4 and loaded.config.rope_interleave
    assert all(torch.equal(t, loaded.state_dict()[name]) for name, t in model.state_dict().items())
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert_rel_close(loaded(ids).logits, model(ids).logits, 1e-5, "logits")


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"qk_nope_head_dim": 8}, "qk_nope_head_dim", "unset unless kv_lora_rank"),
        ({"kv_lora_rank": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}, "qk_nope_head_dim", "a positive integer"),
        ({"kv_lora_rank": 0}, "kv_lora_rank", "a positive integer or None"),
        ({"kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 3, "v_head_dim": 8}, "qk_rope_head_dim",
         "an even number"),
        ({"kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "head_dim": 8},
         "head_dim", "qk_rope_head_dim=4"),
        ({"kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}, "num_key_value_heads",
         "num_attention_heads=4"),
        ({"kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "num_key_value_heads": 4,
          "qk_norm": True}, "qk_norm", "off with multi-head latent attention"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1,
                              "original_max_position_embeddings": 4}}, r"rope_parameters\['llama_4_scaling_beta'\]",
         "unset unless kv_lora_rank"),
        ({"kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "num_key_value_heads": 4,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1}},
         r"rope_parameters\['original_max_position_embeddings'\]", "a positive integer with llama_4_scaling_beta"),
    ],
)
def test_bad_mla_field_is_refused_with_a_clear_error(overrides, field, expected):
    with pytest.raises(ValueError, match=rf"HfMoeConfig\.{field}=.*{expected}"):
        tiny_config(**overrides)


def save_deepseek(tmp_path, **overrides) -> tuple[DeepseekV3ForCausalLM, Path]:
    """A tiny DeepSeek-V3 saved by transformers (per-expert tensors, as transformers 5 writes them)."""
    reference = DeepseekV3ForCausalLM(deepseek_config(**overrides)).eval()
    randomise_router(reference)
    reference.save_pretrained(tmp_path / "deepseek")
    return reference, tmp_path / "deepseek"


def test_from_pretrained_of_a_deepseek_v3_checkpoint_equals_transformers(tmp_path):
    reference, path = save_deepseek(tmp_path, rope_parameters=YARN)
    model = HfMoeForCausalLM.from_pretrained(path)
    assert model.config.kv_lora_rank == 12 and model.config.use_expert_bias and model.config.first_k_dense == 1
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert_rel_close(model(ids).logits, reference(ids).logits, 1e-5, "logits")
    want = reference.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False), want)


def test_multi_token_prediction_layers_are_left_out_as_transformers_does(tmp_path):
    reference, path = save_deepseek(tmp_path, num_hidden_layers=2)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.2.eh_proj.weight"] = torch.randn(32, 64)  # DeepSeek-V3's next-token-prediction module
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = HfMoeForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert_rel_close(model(ids).logits, reference(ids).logits, 1e-5, "logits")


@pytest.mark.parametrize(("field", "value"), [("topk_method", "group_limited_greedy"), ("scoring_func", "softmax"),
                                              ("moe_layer_freq", 2), ("a_field_hf_moe_does_not_know", 1)])
def test_deepseek_config_fields_that_would_change_the_model_are_refused(tmp_path, field, value):
    _, path = save_deepseek(tmp_path, num_hidden_layers=2)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(InteropError, match=field):
        HfMoeForCausalLM.from_pretrained(path)


def test_cli_converts_to_hf_moe_and_exports_back_to_deepseek_v3(tmp_path):
    reference, path = save_deepseek(tmp_path, num_hidden_layers=2)
    assert cli_main(["convert", str(path), str(tmp_path / "hf"), "--no-progress"]) == 0
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "deepseek_v3",
                     "--no-progress"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(exported) is DeepseekV3ForCausalLM
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert_rel_close(exported(ids).logits, reference(ids).logits, 1e-5, "exported logits")


def test_grouped_query_model_is_refused_by_deepseek_v3_export(tmp_path, capsys):
    HfMoeForCausalLM(tiny_config(scoring_func="sigmoid", use_expert_bias=True)).save_pretrained(tmp_path / "gqa")
    assert cli_main(["convert", str(tmp_path / "gqa"), str(tmp_path / "out"), "--to", "deepseek_v3",
                     "--no-progress"]) == 2
    assert "kv_lora_rank=None" in capsys.readouterr().err and not (tmp_path / "out").exists()


MLA = dict(num_key_value_heads=4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
DEEPSEEK_ROUTING = dict(scoring_func="sigmoid", use_expert_bias=True, num_shared_experts=1)


@pytest.mark.parametrize(("overrides", "named"), [
    ({**DEEPSEEK_ROUTING, "scoring_func": "softmax", "use_expert_bias": False}, "scoring_func='softmax'"),
    ({**DEEPSEEK_ROUTING, "use_expert_bias": False}, "use_expert_bias=False"),
    ({**DEEPSEEK_ROUTING, "num_shared_experts": 0}, "num_shared_experts=0"),
    ({**DEEPSEEK_ROUTING, "shared_expert_intermediate_size": 40}, "shared_expert_intermediate_size=40"),
    ({**DEEPSEEK_ROUTING, "moe_layers": [0]}, r"moe_layers=\[0\]"),
    ({**DEEPSEEK_ROUTING, "n_group": 6, "topk_group": 3}, "n_group=6"),
])
def test_mla_models_deepseek_v3_cannot_express_are_refused_and_nothing_is_written(tmp_path, overrides, named):
    HfMoeForCausalLM(tiny_config(**MLA, **overrides)).save_pretrained(tmp_path / "model")
    with pytest.raises(InteropError, match=named):
        convert(tmp_path / "model", tmp_path / "out", to="deepseek_v3", progress=False)
    assert not (tmp_path / "out").exists()


def test_lora_on_an_imported_deepseek_v3_adapts_the_latent_projections_merges_and_exports(tmp_path):
    from peft import get_peft_model

    from hf_moe.integrations import lora_config

    reference, path = save_deepseek(tmp_path, num_hidden_layers=2)
    # float64: merged and adapted differ by rounding only, which in float32 can flip a near-tied routing choice
    model = HfMoeForCausalLM.from_pretrained(path, dtype=torch.float64)
    model = get_peft_model(model, lora_config(r=2, init_lora_weights=False)).eval()
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1]
               for name, _ in model.named_parameters() if "self_attn" in name and "lora_A" in name}
    assert adapted == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        adapted_logits = model(ids).logits
        assert (adapted_logits - reference(ids).logits.double()).abs().max() > 1e-3, "the adapter changes the model"
    merged = model.merge_and_unload()
    with torch.no_grad():
        want = merged(ids).logits
    # merging adds B·A into the weights: the same function up to rounding (a random, untrained adapter is large)
    assert_rel_close(want, adapted_logits, 1e-3, "merged vs adapted")
    merged.save_pretrained(tmp_path / "merged")
    convert(tmp_path / "merged", tmp_path / "exported", to="deepseek_v3", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_rel_close(exported(ids).logits, merged.float()(ids).logits, 1e-5, "merged LoRA exported to deepseek_v3")


@requires_cuda
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_cuda_direct_load_equals_transformers(tmp_path, attn_implementation, dtype, tol):
    """On the GPU, through hf-moe's default (Triton) experts: float32 logits to float32 rounding and equal greedy
    generation, bfloat16 logits to bfloat16 rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    _, path = save_deepseek(tmp_path, rope_parameters=YARN)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model = HfMoeForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                             device="cuda")
    reference = reference.cuda().eval()
    assert model.model.layers[1].mlp.router.expert_bias.dtype == torch.float32
    ids = torch.randint(0, 97, (2, 11), device="cuda")
    with torch.no_grad():
        assert_rel_close(model(ids).logits.float(), reference(ids).logits.float(), tol, "logits")
    if dtype == torch.float32:
        want = reference.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
