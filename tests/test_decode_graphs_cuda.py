"""CUDA-graph decoding on a GPU: static-cache generate through `hf_moe.CUDAGraphConfig` equals the same generate run
eagerly (`disable_compile=True`: the same kernels, so the same tokens and logits) and dynamic-cache greedy decoding,
at batch 1 and with left padding, over successive calls, through the MoE paths' Triton kernels."""

import pytest
import torch

from hf_moe import CUDAGraphConfig, HfMoeForCausalLM
from hf_moe.decode_graphs import CapturedStep, decode_graphs, default_graph_decoding

from .conftest import requires_cuda, tiny_config

pytestmark = requires_cuda

CONFIGS = {
    "topk": {},
    "shared_expert": {"num_shared_experts": 1, "shared_expert_gate": True},
    "sinks": {"attention_sinks": True, "attention_bias": True},  # GPT-OSS's attention on full layers
    "product_key": {"router_type": "product_key", "num_experts": 49, "num_experts_per_tok": 5,
                    "moe_intermediate_size": 1, "gated_experts": False, "hidden_act": "relu2"},
    "mla": {"num_key_value_heads": 4, "kv_lora_rank": 12, "q_lora_rank": 10, "qk_rope_head_dim": 4, "v_head_dim": 6,
            "qk_nope_head_dim": 8},
    "granite_post_norm": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.125,
                          "logits_scaling": 6.0, "norm_placement": "post", "qk_norm": True,
                          "qk_norm_scope": "projection"},
}
LOGITS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def cuda_model(dtype: torch.dtype, **overrides) -> HfMoeForCausalLM:
    torch.manual_seed(0)
    return HfMoeForCausalLM(tiny_config(**overrides)).to("cuda", dtype).eval()


def greedy(model, ids, mask=None, *, cache="static", graphs=False, new_tokens=10):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
        kwargs.update(compile_config=CUDAGraphConfig()) if graphs else kwargs.update(disable_compile=True)
    return model.generate(ids, attention_mask=mask, **kwargs)


def assert_same_generation(got, want, dtype):
    assert torch.equal(got.sequences, want.sequences)
    for step, (g, w) in enumerate(zip(got.logits, want.logits, strict=True)):
        torch.testing.assert_close(g, w, rtol=LOGITS_TOL[dtype], atol=LOGITS_TOL[dtype], msg=f"step {step}")


def captured(model) -> list[bool]:
    return [isinstance(step, CapturedStep) for step in decode_graphs(model).graphs.values()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CONFIGS))
def test_graphed_generate_equals_eager_static_generate(case, dtype):
    model = cuda_model(dtype, **CONFIGS[case])
    ids = torch.randint(1, model.config.vocab_size, (1, 6), device="cuda")
    if dtype == torch.float32 and case != "product_key":  # float32 experts loop over experts on the host: no capture
        with pytest.warns(UserWarning, match="could not be captured"):
            got = greedy(model, ids, graphs=True)
        assert decode_graphs(model).uncapturable and not decode_graphs(model).graphs  # eager from then on
    else:
        got = greedy(model, ids, graphs=True)
        assert captured(model) == [True]  # every decode step was served by one graph
    assert_same_generation(got, greedy(model, ids), dtype)


def test_graphed_generate_equals_dynamic_cache_greedy_decoding():
    model = cuda_model(torch.float32, **CONFIGS["product_key"])
    ids = torch.randint(1, model.config.vocab_size, (2, 5), device="cuda")
    assert torch.equal(greedy(model, ids, graphs=True).sequences, greedy(model, ids, cache="dynamic").sequences)
    assert captured(model) == [True]


def test_left_padded_batch():
    model = cuda_model(torch.bfloat16)
    ids = torch.randint(1, model.config.vocab_size, (3, 7), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    assert_same_generation(greedy(model, ids, mask, graphs=True), greedy(model, ids, mask), torch.bfloat16)
    assert captured(model) == [True]


def test_successive_calls_reuse_or_recapture():
    model = cuda_model(torch.bfloat16)
    ids = torch.randint(1, model.config.vocab_size, (1, 6), device="cuda")
    first = greedy(model, ids, graphs=True)
    again = greedy(model, ids, graphs=True)  # the same cache shape: transformers resets its cache, the graph replays
    assert_same_generation(again, first, torch.bfloat16)
    other = torch.randint(1, model.config.vocab_size, (2, 9), device="cuda")
    assert_same_generation(greedy(model, other, graphs=True, new_tokens=6), greedy(model, other, new_tokens=6),
                           torch.bfloat16)
    assert_same_generation(greedy(model, ids, graphs=True), first, torch.bfloat16)
    assert all(captured(model))


def test_replaced_weights_are_read_after_recapture():
    model = cuda_model(torch.bfloat16)
    ids = torch.randint(1, model.config.vocab_size, (1, 6), device="cuda")
    greedy(model, ids, graphs=True)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    assert_same_generation(greedy(model, ids, graphs=True), greedy(model, ids), torch.bfloat16)
    assert captured(model) == [True]


def test_plain_generate_calls_reuse_the_graph():
    """A finished generate frees its cache: the next one's cache, where the allocator gives it the same memory,
    replays the graph, otherwise it is captured anew; either way the same tokens."""
    model = cuda_model(torch.bfloat16)
    ids = torch.randint(1, model.config.vocab_size, (1, 6), device="cuda")
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    first = model.generate(ids, compile_config=CUDAGraphConfig(), **kwargs)
    again = model.generate(ids, compile_config=CUDAGraphConfig(), **kwargs)
    assert torch.equal(first, again) and torch.equal(first, model.generate(ids, disable_compile=True, **kwargs))
    assert captured(model) in ([True], [True, True])  # reused when the allocator gave the same memory


@pytest.mark.parametrize("overrides", [{"sliding_window": 4}, {"output_router_logits": True}],
                         ids=["sliding_window", "recorded_outputs"])
def test_steps_a_replay_cannot_serve_decode_eagerly(overrides):
    model = cuda_model(torch.bfloat16, **overrides)
    ids = torch.randint(1, model.config.vocab_size, (1, 6), device="cuda")
    assert_same_generation(greedy(model, ids, graphs=True), greedy(model, ids), torch.bfloat16)
    assert not decode_graphs(model).graphs


@pytest.mark.parametrize("case", ["topk", "mla"])
def test_plain_generate_decodes_from_graphs_by_default(case):
    """A generate call that asks for no cache decodes from CUDA graphs (the same tokens as the eager static-cache
    steps); `cache_implementation="dynamic"` keeps eager decoding."""
    model = cuda_model(torch.bfloat16, **CONFIGS[case])
    ids = torch.randint(1, model.config.vocab_size, (2, 6), device="cuda")
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert default_graph_decoding(model, (ids,), kwargs) is None
    plain = model.generate(ids, **kwargs)
    assert captured(model) == [True]
    assert torch.equal(plain, model.generate(ids, cache_implementation="static", disable_compile=True, **kwargs))
    decode_graphs(model).graphs.clear()
    model.generate(ids, cache_implementation="dynamic", **kwargs)
    assert not decode_graphs(model).graphs

