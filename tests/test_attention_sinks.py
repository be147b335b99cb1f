"""Attention sinks (GPT-OSS) and per-layer attention types: hf-moe's attention equals transformers' GptOssAttention
(weights copied in) and float64 maths written out here, forward and gradients; a model with sinks and mixed full /
sliding layers decodes with its cache, left padded, from a static cache and compiled as it computes without them."""

import copy

import pytest
import torch
from torch import nn
from transformers import CompileConfig, GptOssConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding

from hf_moe import HfMoeForCausalLM
from hf_moe.attention import HfMoeAttention, HfMoeRotaryEmbedding, attend

from .conftest import assert_cached_greedy_equals_full_forward, assert_rel_close, tiny_config

MIXED = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=3)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def left_padded(batch: int, length: int) -> torch.Tensor:
    """A padding mask whose first row has 2 padding tokens on the left."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    return mask


def sink_model(attn_implementation: str = "eager", **overrides) -> HfMoeForCausalLM:
    """A tiny model with sinks and a sliding then a full layer; sinks large enough to take a visible share."""
    model = HfMoeForCausalLM(tiny_config(attention_sinks=True, attention_bias=True,
                                         attn_implementation=attn_implementation, **{**MIXED, **overrides}))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model.eval()


def reference_attention(q, k, v, allowed, sinks, scaling):
    """The definition in float64, one (batch, head, query) at a time: weights `exp(s_j) / (Σ_allowed exp(s) +
    exp(sink_h))` over the allowed keys j (s = q·k·scaling), output `Σ_j weight_j · v_j`; `[B, Q, heads, v_dim]`."""
    q, k, v, sinks = (t.double() for t in (q, k, v, sinks))
    batch, heads, q_len, _ = q.shape
    groups = heads // k.shape[1]
    rows = []
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                scores = (k[b, h // groups] @ q[b, h, i]) * scaling
                keep = allowed[b, i]
                top = torch.maximum(scores[keep].max() if keep.any() else sinks[h], sinks[h]).detach()
                e = torch.where(keep, torch.exp(scores - top), torch.zeros_like(scores))
                rows.append((e @ v[b, h // groups]) / (e.sum() + torch.exp(sinks[h] - top)))
    return torch.stack(rows).view(batch, heads, q_len, -1).transpose(1, 2)


class Stub(nn.Module):
    """What `attend` reads of an attention module."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config, self.scaling, self.attention_dropout = config, 0.4, 0.0


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("attn_implementation,padded", [("eager", True), ("sdpa", True), ("sdpa", False)])
def test_sink_attention_and_its_gradients_equal_float64_maths(attn_implementation, padded, window):
    """transformers' masks (additive for eager, boolean for sdpa, none where sdpa's own causal mask serves)
    through `attend` with sinks, against the definition with the allowed keys written out here."""
    config = tiny_config(sliding_window=window, attn_implementation=attn_implementation)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 7, 8
    q, k, v = (torch.randn(batch, n, length, dim, requires_grad=True) for n in (heads, kv_heads, kv_heads))
    sinks = torch.randn(heads, requires_grad=True)
    padding = left_padded(batch, length) if padded else None
    mask_function = create_causal_mask if window is None else create_sliding_window_causal_mask
    mask = mask_function(config=config, inputs_embeds=torch.zeros(batch, length, 1), attention_mask=padding,
                         past_key_values=None, position_ids=torch.arange(length)[None])
    assert (mask is None) == (attn_implementation == "sdpa" and not padded and window is None)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (j <= i) & (True if window is None else i - j < window)
    allowed = allowed & (torch.ones(batch, length, dtype=torch.bool) if padding is None else padding.bool())[:, None]

    got, _ = attend(Stub(config), q, k, v, mask, sinks)
    want = reference_attention(q, k, v, allowed, sinks, 0.4)
    assert torch.isfinite(got).all()
    real = slice(2, None) if padded else slice(None)  # padded queries see no key: their output is the sink's, 0
    assert_rel_close(got.view(batch, length, heads, dim)[:, real], want[:, real], 1e-5, "output")
    probe = torch.randn_like(want[:, real])
    grads = torch.autograd.grad((got.view_as(want)[:, real] * probe).sum(), (sinks, q, k, v))
    want_grads = torch.autograd.grad((want[:, real] * probe.double()).sum(), (sinks, q, k, v))
    for name, g, w in zip(("sinks", "q", "k", "v"), grads, want_grads):
        assert_rel_close(g, w, 1e-5, f"grad of {name}")


@pytest.mark.parametrize("layer_idx", [0, 1])  # GPT-OSS: layer 0 slides, layer 1 attends to everything
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_with_sinks_equals_transformers_gpt_oss_attention(attn_implementation, layer_idx):
    theirs_config = GptOssConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 num_hidden_layers=2, sliding_window=3, rope_parameters=ROPE)
    theirs_config._attn_implementation = "eager"
    config = tiny_config(head_dim=8, sliding_window=3, layer_types=theirs_config.layer_types, attention_bias=True,
                         attention_sinks=True, attn_implementation=attn_implementation)
    reference = GptOssAttention(theirs_config, layer_idx).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0.0, 0.5)
    ours = HfMoeAttention(config, layer_idx).eval()
    ours.load_state_dict(reference.state_dict())  # GPT-OSS's names: q/k/v/o_proj with biases, sinks
    x, padding, positions = torch.randn(2, 9, 32), left_padded(2, 9), torch.arange(9)[None]
    mask_function = create_sliding_window_causal_mask if layer_idx == 0 else create_causal_mask
    masks = [mask_function(config=c, inputs_embeds=x, attention_mask=padding, past_key_values=None,
                           position_ids=positions) for c in (theirs_config, config)]
    want, _ = reference(x, GptOssRotaryEmbedding(theirs_config)(x, positions), masks[0])
    got, _ = ours(x, HfMoeRotaryEmbedding(config)(x, positions), masks[1])
    assert_rel_close(got[:, 2:], want[:, 2:], 1e-5, f"layer {layer_idx}")
    assert_rel_close(got[1], want[1], 1e-5, "unpadded row, every query")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_model_with_sinks_and_mixed_layers_decodes_with_its_cache_and_ignores_left_padding(attn_implementation):
    model = sink_model(attn_implementation)
    assert "model.layers.0.self_attn.sinks" in model.state_dict()
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [3, None]
    assert_cached_greedy_equals_full_forward(model, torch.randint(0, 97, (2, 5)), new_tokens=5)
    ids, padding = torch.randint(1, 97, (2, 8)), left_padded(2, 8)
    with torch.no_grad():
        padded = model(ids, attention_mask=padding).logits
        alone = model(ids[:1, 2:]).logits
    assert_rel_close(padded[0, 2:], alone[0], 1e-5, "left-padded row")


@pytest.mark.parametrize("compiled,padded", [(False, False), (False, True), (True, True)])
def test_static_cache_generate_of_a_mixed_model_with_sinks_equals_dynamic_cache(compiled, padded):
    """Unpadded, transformers leaves out the prefill's mask over the static cache (SDPA's top-left causal mask)."""
    model = sink_model("sdpa")
    ids = torch.randint(1, 97, (2, 6))
    padding = left_padded(2, 6) if padded else torch.ones_like(ids)
    kwargs = dict(attention_mask=padding, max_new_tokens=4, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    dynamic = model.generate(ids, **kwargs)
    if compiled:
        kwargs["compile_config"] = CompileConfig(fullgraph=True, mode="default")
        kwargs["compile_config"]._compile_all_devices = True  # transformers compiles on accelerators only by default
        torch._dynamo.reset()
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert ("_compiled_call" in model.__dict__) == compiled
    assert torch.equal(static.sequences, dynamic.sequences)
    assert_rel_close(torch.stack(static.logits), torch.stack(dynamic.logits), 1e-5, "logits")


def test_compiled_fullgraph_attention_with_sinks_equals_eager_forward_and_backward():
    """A sliding layer's attention with sinks under `torch.compile(fullgraph=True)` (one graph), left padded: the
    output and every gradient, the sinks' included, equal eager's; training moves every sink."""
    model = sink_model("sdpa").train()
    attention = model.model.layers[0].self_attn
    x, padding, positions = torch.randn(2, 7, 32), left_padded(2, 7), torch.arange(7)[None]
    mask = create_sliding_window_causal_mask(config=model.config, inputs_embeds=x, attention_mask=padding,
                                             past_key_values=None, position_ids=positions)
    rope = model.model.rotary_emb(x, positions)
    probe = torch.randn(2, 7, 32)
    compiled = torch.compile(copy.deepcopy(attention), fullgraph=True)
    torch._dynamo.reset()
    results = []
    for module in (compiled, attention):
        inputs = x.clone().requires_grad_(True)
        out, _ = module(inputs, rope, mask)
        (out * probe).sum().backward()
        results.append((out.detach(), inputs.grad, *(p.grad for p in module.parameters())))
    names = ["out", "x.grad", *(name for name, _ in attention.named_parameters())]
    for name, got, want in zip(names, *results, strict=True):
        assert_rel_close(got, want, 1e-5, name)
    assert attention.sinks.grad.abs().min() > 0


def test_kernels_that_cannot_take_sinks_are_refused():
    model = sink_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' cannot run attention sinks"):
        model(torch.randint(0, 97, (1, 4)))
    assert not sink_model().supports_context_parallel
