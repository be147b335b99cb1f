"""DeepSeek sparse attention (`hf_moe.sparse_attention`): the lightning indexer's selection against a float64
brute-force reference written here (scores per query and key, top-k among the visible keys), every key kept when a
sequence is no longer than `index_topk`, training against transformers' DeepSeek-V3.2 (loss and every gradient; the
indexer gets none, as there), torch.compile(fullgraph=True) against eager, and the refusals. Logits, cached greedy
generation and conversions against transformers' classes are the `deepseek_v32` / `glm_moe_dsa` cases of
`test_interop.py`."""

import copy
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, CompileConfig, StaticCache

from hf_moe import HfMoeForCausalLM
from hf_moe.interop import FAMILIES, to_hf_moe_config
from hf_moe.sparse_attention import HfMoeLightningIndexer

from .conftest import assert_rel_close, requires_cuda, tiny_config

DSA = dict(num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=6, rope_interleave=True, index_topk=3, index_n_heads=6, index_head_dim=8)


def randomise(module: torch.nn.Module) -> None:
    """Every parameter random (norms around 1, routers decisive), so that each one shows in the output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.dtype)
            scale = 0.5 if "router" in name or "gate.weight" in name else 0.2
            tensor.copy_(1 + scale * noise if "norm" in name else scale * noise)


def rope64(x: torch.Tensor, positions: torch.Tensor, rotary: int, interleave: bool, theta: float) -> torch.Tensor:
    """RoPE in float64 on the first `rotary` dims of `x [B, S, ..., D]` at `positions [S]`: pair j is `(x_j,
    x_{j+rotary/2})`, or `(x_{2j}, x_{2j+1})` with `interleave`, turned by `position · theta^(-2j/rotary)`."""
    half = rotary // 2
    angle = positions[:, None].double() * theta ** (-2 * torch.arange(half, dtype=torch.float64) / rotary)
    shape = (1, len(positions)) + (1,) * (x.dim() - 3) + (half,)
    cos, sin = angle.cos().view(shape), angle.sin().view(shape)
    first = torch.arange(0, rotary, 2) if interleave else torch.arange(half)
    second = first + 1 if interleave else first + half
    a, b = x[..., first], x[..., second]
    out = x.clone()
    out[..., first], out[..., second] = a * cos - b * sin, a * sin + b * cos
    return out


def reference_scores(indexer: HfMoeLightningIndexer, hidden: torch.Tensor, latent: torch.Tensor, rotary: int,
                     theta: float) -> torch.Tensor:
    """Index scores `[B, S, T]` in float64, query by query and key by key:
    `Σ_h w_h(s) · relu(q_h(s)·k(t) / √D)`, `w = weights_proj(x)/√H`, `k = LayerNorm(wk(x))`, both RoPE'd."""
    heads, dim = indexer.num_heads, indexer.head_dim
    hidden, latent = hidden.double(), latent.double()
    positions = torch.arange(hidden.shape[1])
    q = (latent @ indexer.wq_b.weight.double().T).view(*hidden.shape[:2], heads, dim)
    k = hidden @ indexer.wk.weight.double().T
    k = (k - k.mean(-1, keepdim=True)) / torch.sqrt(k.var(-1, unbiased=False, keepdim=True) + indexer.k_norm.eps)
    k = k * indexer.k_norm.weight.double() + indexer.k_norm.bias.double()
    q = rope64(q, positions, rotary, indexer.rope_interleave, theta)
    k = rope64(k, positions, rotary, indexer.rope_interleave, theta)
    w = hidden @ indexer.weights_proj.weight.double().T / math.sqrt(heads)
    batch, length = hidden.shape[:2]
    scores = torch.zeros(batch, length, length, dtype=torch.float64)
    for b in range(batch):
        for s in range(length):
            for t in range(length):
                per_head = [max(float(q[b, s, h] @ k[b, t]) / math.sqrt(dim), 0.0) for h in range(heads)]
                scores[b, s, t] = sum(float(w[b, s, h]) * per_head[h] for h in range(heads))
    return scores


def indexer_inputs(config, batch: int, length: int, pad: int):
    """A random indexer, its inputs for a left-padded batch, the RoPE tables and the boolean visibility
    `[B, S, T]` (causal, padding keys hidden)."""
    model = HfMoeForCausalLM(config)
    attention = model.model.layers[0].self_attn
    randomise(attention)
    hidden = torch.randn(batch, length, config.hidden_size)
    latent = attention.q_a_layernorm(attention.q_a_proj(hidden))
    rope = model.model.rotary_emb(hidden, torch.arange(length)[None])
    real = torch.ones(batch, length, dtype=torch.bool)
    real[0, :pad] = False
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None] & real[:, None, :]
    return attention.indexer, hidden, latent, rope, visible


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_selection_equals_a_float64_brute_force_reference(interleave, mask_kind):
    """Each query keeps exactly the `index_topk` keys with the highest reference scores among those it may see (all
    of them when it sees fewer), and no key it may not see; with boolean and with additive masks."""
    config = tiny_config(**{**DSA, "indexer_rope_interleave": interleave, "index_topk": 4, "index_head_dim": 12})
    indexer, hidden, latent, rope, visible = indexer_inputs(config, batch=2, length=10, pad=3)
    queries, keys = indexer.project(hidden, latent, rope)
    mask = visible[:, None]
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    got = indexer.sparse_mask(hidden, queries, keys, mask)
    kept = got[:, 0] if got.dtype == torch.bool else got[:, 0] == 0
    scores = reference_scores(indexer, hidden, latent, config.qk_rope_head_dim, config.rope_parameters["rope_theta"])
    for b in range(2):
        for s in range(10):
            seen, chosen = visible[b, s], kept[b, s]
            assert not (chosen & ~seen).any(), f"query {b},{s} keeps a key it may not see"
            assert chosen.sum() == min(4, seen.sum()), f"query {b},{s} keeps {chosen.sum()} keys"
            rest = seen & ~chosen
            if rest.any():  # the kept keys outscore the dropped ones (a float32 near-tie may go either way)
                gap = scores[b, s][chosen].min() - scores[b, s][rest].max()
                assert gap >= -1e-5 * scores[b, s][seen].abs().max(), f"query {b},{s}: a better key is dropped"


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_no_more_keys_than_index_topk_keeps_every_visible_key(mask_kind):
    """Up to `index_topk` keys (padding included) the mask is the attention's own, as transformers' top-k of all
    the keys leaves it; one key more and the selection applies."""
    config = tiny_config(**{**DSA, "index_topk": 8})
    indexer, hidden, latent, rope, visible = indexer_inputs(config, batch=2, length=8, pad=3 if mask_kind else 0)
    queries, keys = indexer.project(hidden, latent, rope)
    mask = {"bool": visible[:, None], "none": None,
            "additive": torch.zeros(2, 1, 8, 8).masked_fill(~visible[:, None], -1e30)}[mask_kind]
    assert indexer.sparse_mask(hidden, queries, keys, mask) is mask
    longer = torch.cat([keys, keys[:, :, :1]], dim=2)  # a ninth key, visible to every query
    assert indexer.sparse_mask(hidden, queries, longer, None).sum(-1).max() == 8


def transformers_pair(**overrides):
    """A tiny transformers DeepSeek-V3.2 (eager) and the hf-moe model the deepseek_v32 family maps it to, with its
    weights; 16 indexer heads, so that keys seldom tie at 0, where transformers' CPU top-k keeps other keys."""
    kwargs = dict(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=12,
                  kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, index_topk=3,
                  index_n_heads=16, index_head_dim=8, eos_token_id=None)
    config = AutoConfig.for_model("deepseek_v32", **{**kwargs, **overrides})
    config._attn_implementation = "eager"
    reference = AutoModelForCausalLM.from_config(config)
    randomise(reference)
    hf_config = to_hf_moe_config(FAMILIES["deepseek_v32"], config)
    hf_config._attn_implementation = "eager"
    model = HfMoeForCausalLM(hf_config)
    renames = {"mlp.gate.weight": "mlp.router.weight", "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias"}
    state = {}
    for name, tensor in reference.state_dict().items():
        for old, new in renames.items():
            name = name.replace(old, new)
        state[name] = tensor
    model.load_state_dict(state, strict=True)
    return reference, model, renames


def test_training_loss_and_gradients_equal_transformers():
    """A training step's loss and every gradient equal transformers' DeepSeek-V3.2: the attention learns through the
    selection, the indexer gets no gradient (transformers computes it without gradients too)."""
    reference, model, renames = transformers_pair()
    ids = torch.randint(0, 61, (2, 9))
    got, want = model.train()(input_ids=ids, labels=ids), reference.train()(input_ids=ids, labels=ids)
    got.loss.backward()
    want.loss.backward()
    assert_rel_close(got.loss, want.loss, 1e-5, "loss")
    params = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        for old, new in renames.items():
            name = name.replace(old, new)
        if ".indexer." in name:
            assert param.grad is None and params[name].grad is None, f"{name} has a gradient"
        else:
            assert params[name].grad is not None, name
            assert_rel_close(params[name].grad, param.grad, 1e-4, name)


def test_compiled_fullgraph_attention_forward_and_backward_equal_eager():
    """The attention with its indexer compiles into one graph with its backward (no data-dependent host
    synchronisation; dynamo and AOTAutograd, inductor's code generation being the static-cache test's); the compiled
    forward and backward over a left-padded batch equal eager."""
    model = HfMoeForCausalLM(tiny_config(**DSA, num_hidden_layers=1))
    randomise(model)
    attention = model.model.layers[0].self_attn.train()
    x = torch.randn(2, 9, 32)
    rope = model.model.rotary_emb(x, torch.arange(9)[None])
    visible = torch.ones(9, 9, dtype=torch.bool).tril().repeat(2, 1, 1, 1)
    visible[0, :, :, :2] = False  # two padding tokens
    compiled = torch.compile(copy.deepcopy(attention), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    results = []
    for module in (compiled, attention):
        inp = x.clone().requires_grad_(True)
        out = module(inp, rope, visible)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), inp.grad, *(p.grad for p in module.parameters() if p.grad is not None)))
    assert len(results[0]) == len(results[1]) == 2 + 7, "the latent attention's seven weights get gradients"
    for got, want in zip(*results):
        assert_rel_close(got, want, 1e-5, "compiled vs eager")


def test_compiled_static_cache_generate_equals_dynamic_cache():
    """Static-cache decoding (every slot of the cache is a key, the unwritten ones masked) compiled with
    fullgraph=True generates what dynamic-cache decoding generates."""
    model = HfMoeForCausalLM(tiny_config(**DSA, num_hidden_layers=1)).eval()
    randomise(model)
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))  # not the prompt of the test below
    dynamic = model.generate(ids, max_new_tokens=4, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles generation on accelerators only by default
    torch._dynamo.reset()
    static = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static",
                            compile_config=compile_config)
    assert "_compiled_call" in model.__dict__, "generate did not compile the forward"
    assert torch.equal(static, dynamic)


def test_static_cache_prefill_equals_the_forward_whatever_the_cache_length():
    """The prompt an unseeded run of the test above once drew: a prefill into a static cache must compute the
    forward's logits whatever the number of slots (the unwritten ones are masked). Its second row's last query
    scores keys 4 and 5 exactly 0, tied for the third place: `torch.topk` on the CPU kept key 4 with 8, 9 or 12
    slots and key 5 without a cache."""
    model = HfMoeForCausalLM(tiny_config(**DSA, num_hidden_layers=1)).eval()
    randomise(model)
    ids = torch.tensor([[70, 81, 10, 42, 95, 71], [64, 59, 24, 84, 86, 26]])
    with torch.no_grad():
        want = model(ids).logits
        for slots in range(6, 13):
            got = model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=slots), use_cache=True)
            assert_rel_close(got.logits, want, 1e-5, f"{slots} slots")


@pytest.mark.parametrize(("overrides", "field", "expected"), [
    ({"index_topk": 4}, "index_n_heads", "a positive integer with DeepSeek sparse attention"),
    ({"index_n_heads": 4}, "index_n_heads", "unset unless index_topk"),
    ({"indexer_rope_interleave": True}, "indexer_rope_interleave", "unset unless index_topk"),
    ({**DSA, "kv_lora_rank": None}, "q_lora_rank", "unset unless kv_lora_rank"),
    ({**DSA, "q_lora_rank": None}, "q_lora_rank", "a positive integer with index_topk set"),
    ({**DSA, "index_head_dim": 2}, "index_head_dim", "at least qk_rope_head_dim=4"),
    ({**DSA, "index_topk": 0}, "index_topk", "a positive integer"),
    ({**DSA, "indexer_rope_interleave": "yes"}, "indexer_rope_interleave", "True or False"),
])
def test_bad_sparse_attention_fields_are_refused(overrides, field, expected):
    with pytest.raises(ValueError, match=rf"HfMoeConfig\.{field}=.*{expected}"):
        tiny_config(**overrides)


def test_attention_kernels_without_a_dense_mask_are_refused():
    config = tiny_config(**DSA)
    config._attn_implementation = "flex_attention"
    indexer, hidden, latent, rope, _ = indexer_inputs(config, batch=1, length=4, pad=0)
    with pytest.raises(ValueError, match="attn_implementation in \\('eager', 'sdpa'\\).*'flex_attention'"):
        indexer.sparse_mask(hidden, *indexer.project(hidden, latent, rope), None)


@requires_cuda
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_cuda_logits_and_greedy_generation_equal_transformers(tmp_path, attn_implementation):
    """On the GPU, float32 without TF32: a saved DeepSeek-V3.2 loaded by hf-moe (default experts) computes
    transformers' logits and greedy generation, the selection included."""
    torch.backends.cuda.matmul.allow_tf32 = False
    reference, _, _ = transformers_pair()
    reference.save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn_implementation).cuda().eval()
    model = HfMoeForCausalLM.from_pretrained(tmp_path, attn_implementation=attn_implementation, device="cuda").eval()
    ids = torch.randint(0, 61, (2, 11), device="cuda")
    with torch.no_grad():
        assert_rel_close(model(ids).logits, reference(ids).logits, 1e-5, "logits")
    want = reference.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), want)
