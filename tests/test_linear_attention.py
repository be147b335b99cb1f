"""Gated DeltaNet (`hf_moe.linear_attention`) against transformers' own Qwen3-Next, Qwen3.5 and Qwen3.5-MoE mixers
with the same weights (with and without left padding, prefill and cached decode), against the paper's recurrence
written out here token by token in float64 (outputs and gradients), and against itself: cached decode equals one
full forward, the chunked rule equals the recurrent one across chunk boundaries, compiled equals eager."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, Qwen3NextConfig
from transformers.cache_utils import LinearAttentionLayer
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

from hf_moe.gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from hf_moe.linear_attention import (
    GatedDeltaNet,
    GatedDeltaNetSizes,
    fuse_qwen3_next_projections,
    split_qwen3_next_projections,
)

from .conftest import assert_rel_close

# Two value heads per key head (the key-head sharing shows), a chunk of 8 (the tests' lengths cross chunk
# boundaries), a norm epsilon that is not the L2 normalisation's.
SIZES = GatedDeltaNetSizes(hidden_size=24, num_key_heads=2, num_value_heads=4, key_head_dim=8, value_head_dim=6,
                           conv_kernel_size=4, norm_eps=1e-5, chunk_size=8)
FAMILIES = {
    "qwen3_next": (Qwen3NextConfig, Qwen3NextGatedDeltaNet),
    "qwen3_5_moe": (Qwen3_5MoeTextConfig, Qwen3_5MoeGatedDeltaNet),
    "qwen3_5": (Qwen3_5TextConfig, Qwen3_5GatedDeltaNet),
}


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Weights where every term matters: decays slow enough that a token still counts 20 tokens later, a norm
    weight away from one."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.02, 0.3).log())
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.3)
    return module


def module(dtype: torch.dtype = torch.float32, sizes: GatedDeltaNetSizes = SIZES) -> GatedDeltaNet:
    return randomise(GatedDeltaNet(sizes)).to(dtype)


def transformers_pair(family: str, sizes: GatedDeltaNetSizes = SIZES) -> tuple[torch.nn.Module, GatedDeltaNet, object]:
    """transformers' mixer of `family` with random weights, hf-moe's with the same weights, and the config."""
    config_class, mixer_class = FAMILIES[family]
    config = config_class(hidden_size=sizes.hidden_size, linear_num_key_heads=sizes.num_key_heads,
                          linear_num_value_heads=sizes.num_value_heads, linear_key_head_dim=sizes.key_head_dim,
                          linear_value_head_dim=sizes.value_head_dim, linear_conv_kernel_dim=sizes.conv_kernel_size,
                          rms_norm_eps=sizes.norm_eps, num_hidden_layers=1, layer_types=["linear_attention"])
    reference = randomise(mixer_class(config, 0))
    state = reference.state_dict()
    if family == "qwen3_next":
        split = split_qwen3_next_projections(state.pop("in_proj_qkvz.weight"), state.pop("in_proj_ba.weight"), sizes)
        state.update({f"{name}.weight": tensor for name, tensor in split.items()})
    ours = GatedDeltaNet(sizes)
    ours.load_state_dict(state)
    return reference, ours, config


def left_padding_mask(batch: int, length: int, pads: list[int]) -> torch.Tensor:
    return torch.stack([torch.arange(length) >= pad for pad in pads]).long()


def reference_forward(p: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor | None = None,
                      s: GatedDeltaNetSizes = SIZES) -> torch.Tensor:
    """The mixer from its definition in float64, one token at a time, with the paper's state `S` `[Dv, Dk]`:
    `S_t = S_{t-1} · α_t (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ`, `o_t = S_t q_t`. `p`: the module's parameters."""
    x = x.double() if mask is None else x.double() * mask[..., None]
    batch, length, _ = x.shape
    mixed = x @ p["in_proj_qkv.weight"].T
    taps = p["conv1d.weight"][:, 0]  # [C, K]; tap K-1 multiplies the current token
    padded = torch.cat([mixed.new_zeros(batch, s.conv_kernel_size - 1, s.conv_dim), mixed], dim=1)
    conv = F.silu(sum(taps[:, j] * padded[:, j:j + length] for j in range(s.conv_kernel_size)))
    q, k, v = conv.split([s.key_dim, s.key_dim, s.value_dim], dim=-1)
    key_head = torch.arange(s.num_value_heads) // s.value_heads_per_key_head  # value head h reads key head h // r

    def unit(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(batch, length, -1, s.key_head_dim)[:, :, key_head]
        return t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)

    q, k = unit(q) / math.sqrt(s.key_head_dim), unit(k)
    v = v.reshape(batch, length, -1, s.value_head_dim)
    beta = torch.sigmoid(x @ p["in_proj_b.weight"].T)
    alpha = torch.exp(-torch.exp(p["A_log"]) * F.softplus(x @ p["in_proj_a.weight"].T + p["dt_bias"]))
    state = x.new_zeros(batch, s.num_value_heads, s.value_head_dim, s.key_head_dim)
    eye = torch.eye(s.key_head_dim, dtype=x.dtype)
    outputs = []
    for t in range(length):
        kt, bt = k[:, t, :, :, None], beta[:, t, :, None, None]
        state = state @ (alpha[:, t, :, None, None] * (eye - bt * kt @ kt.mT)) + bt * v[:, t, :, :, None] @ kt.mT
        outputs.append((state @ q[:, t, :, :, None])[..., 0])
    o = torch.stack(outputs, dim=1)  # [B, T, Hv, Dv]
    z = (x @ p["in_proj_z.weight"].T).reshape(o.shape)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + s.norm_eps) * p["norm.weight"] * F.silu(z)
    return o.reshape(batch, length, -1) @ p["out_proj.weight"].T


def float64_parameters(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().double().requires_grad_() for name, t in m.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_equals_transformers_prefill_and_cached_decode(family, padded):
    """Prefill (with left padding as transformers' models pass it: the 2D mask of the current tokens), a 5-token
    continuation from the cache (chunked rule from a state) and 3 single-token decode steps: every output and the
    cached convolution window and recurrent state equal transformers' mixer's with its own DynamicCache."""
    torch.manual_seed(0)
    reference, ours, config = transformers_pair(family)
    x = torch.randn(2, 19, SIZES.hidden_size)
    mask = left_padding_mask(2, 11, [0, 5]) if padded else None
    # Each side its own DynamicCache from the same config: the layer transformers builds for "linear_attention"
    # is hf-moe's state container too, in 5.17 and 5.23 alike.
    cache, layer = DynamicCache(config=config), DynamicCache(config=config).layers[0]
    with torch.no_grad():
        assert_rel_close(ours(x), reference(x), what="no cache")
        for start, stop in [(0, 11), (11, 16), (16, 17), (17, 18), (18, 19)]:
            step_mask = mask if start == 0 else None
            expected = reference(x[:, start:stop], cache_params=cache, attention_mask=step_mask)
            assert_rel_close(ours(x[:, start:stop], step_mask, layer), expected, what=f"tokens {start}:{stop}")
    theirs = cache.layers[0]
    assert_rel_close(layer.conv_states[0], theirs.conv_states[0], what="convolution window")
    assert_rel_close(layer.recurrent_states[0], theirs.recurrent_states[0], what="recurrent state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_the_papers_recurrence_in_float64(dtype):
    """A left-padded batch, 21 tokens (chunks of 8 and a partial one): equal to the definition, to float32 rounding
    in float32 and to float64 rounding in float64; the padded row's tokens equal the same tokens unpadded."""
    torch.manual_seed(1)
    m = module(dtype)
    x = torch.randn(3, 21, SIZES.hidden_size, dtype=dtype)
    mask = left_padding_mask(3, 21, [0, 6, 13])
    with torch.no_grad():
        out = m(x, mask)
        expected = reference_forward(float64_parameters(m), x, mask)
        assert_rel_close(out.double(), expected, 1e-5 if dtype == torch.float32 else 1e-12, what=str(dtype))
        for row, pad in [(1, 6), (2, 13)]:
            alone = m(x[row:row + 1, pad:])
            assert_rel_close(out[row:row + 1, pad:], alone, 1e-6 if dtype == torch.float32 else 1e-13,
                             what=f"row {row} unpadded")
            assert out[row, :pad].abs().max() == 0  # padding writes and reads nothing


@pytest.mark.parametrize("prefill", [2, 11, 16])
def test_cached_decode_equals_one_full_forward(prefill):
    """Prefill (shorter than the convolution, across a chunk boundary, whole chunks), one token at a time, then a
    9-token continuation: the concatenated outputs equal one forward over all tokens."""
    torch.manual_seed(2)
    m = module(torch.float64)
    x = torch.randn(2, prefill + 13, SIZES.hidden_size, dtype=torch.float64)
    layer = LinearAttentionLayer()
    with torch.no_grad():
        steps = [m(x[:, :prefill], cache_layer=layer)]
        steps += [m(x[:, t:t + 1], cache_layer=layer) for t in range(prefill, prefill + 4)]
        steps.append(m(x[:, prefill + 4:], cache_layer=layer))
        assert_rel_close(torch.cat(steps, dim=1), m(x), 1e-12)


@pytest.mark.parametrize("length", [1, 7, 8, 9, 25])
def test_chunked_rule_equals_recurrent_rule_across_chunk_boundaries(length):
    """From a nonzero initial state, lengths below, at and across multiples of the chunk (8): outputs, final states
    and the gradients of every input of the two algorithms agree to float64 rounding."""
    torch.manual_seed(3)
    batch, heads, dk, dv = 2, 3, 5, 4
    q, k = (F.normalize(torch.randn(batch, length, heads, dk, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(batch, length, heads, dv, dtype=torch.float64)
    log_decay = -torch.rand(batch, length, heads, dtype=torch.float64) * 0.5
    beta = torch.rand(batch, length, heads, dtype=torch.float64)
    state = torch.randn(batch, heads, dk, dv, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, log_decay, beta, state)]
    weights = torch.randn_like(v), torch.randn_like(state)
    results = {}
    for name, rule in [("chunked", partial(chunk_gated_delta_rule, chunk_size=8)),
                       ("recurrent", recurrent_gated_delta_rule)]:
        out, final = rule(*inputs)
        grads = torch.autograd.grad((out * weights[0]).sum() + (final * weights[1]).sum(), inputs)
        results[name] = (out, final, *grads)
    for what, chunked, recurrent in zip(["outputs", "final state", "dq", "dk", "dv", "dg", "dbeta", "dstate"],
                                        results["chunked"], results["recurrent"]):
        assert_rel_close(chunked, recurrent, 1e-12, what=what)


def test_gradients_equal_float64_autograd_of_the_definition():
    """float32 gradients of every parameter and of the input through a left-padded batch equal float64 autograd
    through `reference_forward`."""
    torch.manual_seed(4)
    m = module()
    x = torch.randn(2, 13, SIZES.hidden_size, requires_grad=True)
    mask = left_padding_mask(2, 13, [0, 4])
    weight = torch.randn(2, 13, SIZES.hidden_size)
    (m(x, mask) * weight).sum().backward()
    p64 = float64_parameters(m)
    x64 = x.detach().double().requires_grad_()
    (reference_forward(p64, x64, mask) * weight.double()).sum().backward()
    assert_rel_close(x.grad.double(), x64.grad, 1e-5, what="input")
    for name, param in m.named_parameters():
        assert_rel_close(param.grad.double(), p64[name].grad, 1e-5, what=name)


def test_bfloat16_close_to_transformers_and_to_float64():
    """bfloat16 weights and activations (state and rule in float32, as transformers keeps them): within bf16
    rounding of transformers' Qwen3-Next mixer and of the float64 definition."""
    torch.manual_seed(5)
    reference, ours, _ = transformers_pair("qwen3_next")
    reference, ours = reference.bfloat16(), ours.bfloat16()
    x = torch.randn(2, 19, SIZES.hidden_size).bfloat16()
    mask = left_padding_mask(2, 19, [0, 3])
    layer = LinearAttentionLayer()
    with torch.no_grad():
        out = ours(x, mask, layer)
        assert out.dtype == torch.bfloat16 and layer.recurrent_states[0].dtype == torch.float32
        assert_rel_close(out.float(), reference(x, attention_mask=mask).float(), 1e-3, what="transformers bf16")
        assert_rel_close(out.double(), reference_forward(float64_parameters(ours), x, mask), 3e-2, what="float64")


def test_compiled_fullgraph_equals_eager():
    """`torch.compile(fullgraph=True)` traces every path without a graph break or data-dependent host sync: a
    masked prefill forward and backward (dynamo), and a cached prefill and decode step through AOT autograd's
    functionalisation of the cache updates; outputs, gradients and states equal eager's. (Inductor is left out for
    time: it compiles these graphs cold in over a minute on two CPU cores.)"""
    torch.manual_seed(6)
    m = module()
    x = torch.randn(2, 11, SIZES.hidden_size)
    mask = left_padding_mask(2, 11, [0, 3])
    torch.compile(m, fullgraph=True, backend="eager")(x, mask).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    m(x, mask).square().sum().backward()
    for name, p in m.named_parameters():
        assert_rel_close(grads[name], p.grad, 1e-6, what=name)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    eager_layer, compiled_layer = LinearAttentionLayer(), LinearAttentionLayer()
    with torch.no_grad():  # a cache is for inference: its in-place updates overwrite what autograd saved
        for t in [slice(0, 10), slice(10, 11)]:
            assert_rel_close(compiled(x[:, t], cache_layer=compiled_layer), m(x[:, t], cache_layer=eager_layer))
    assert_rel_close(compiled_layer.recurrent_states[0], eager_layer.recurrent_states[0])
    assert torch.equal(compiled_layer.conv_states[0], eager_layer.conv_states[0])


def test_qwen3_next_projections_convert_both_ways_bit_exactly():
    reference, ours, _ = transformers_pair("qwen3_next")
    fused = fuse_qwen3_next_projections(ours.in_proj_qkv.weight, ours.in_proj_z.weight, ours.in_proj_b.weight,
                                        ours.in_proj_a.weight, SIZES)
    assert torch.equal(fused["in_proj_qkvz"], reference.in_proj_qkvz.weight)
    assert torch.equal(fused["in_proj_ba"], reference.in_proj_ba.weight)
    with pytest.raises(ValueError, match=r"in_proj_ba has shape \(6, 24\), expected \[8, hidden_size\]"):
        split_qwen3_next_projections(reference.in_proj_qkvz.weight, reference.in_proj_ba.weight[:6], SIZES)


def test_bad_sizes_and_masks_are_refused_by_name():
    with pytest.raises(ValueError, match=r"num_value_heads \(3\) must be a multiple of num_key_heads \(2\)"):
        GatedDeltaNetSizes(hidden_size=8, num_key_heads=2, num_value_heads=3, key_head_dim=4, value_head_dim=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        GatedDeltaNetSizes(hidden_size=8, num_key_heads=2, num_value_heads=2, key_head_dim=4, value_head_dim=4,
                           chunk_size=0)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\), expected .* \(2, 5\)"):
        module()(torch.randn(2, 5, SIZES.hidden_size), torch.ones(2, 7))
