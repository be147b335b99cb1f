"""Gated DeltaNet on CUDA at Qwen3-Next's head sizes (128-wide key and value heads, chunks of 64; skipped without a
GPU): equal to the float64 definition and to transformers' Qwen3-Next mixer (its torch fallback, or
flash-linear-attention's kernels where installed), and Inductor-compiled equal to eager."""

import pytest
import torch
from transformers.cache_utils import LinearAttentionLayer

from hf_moe.linear_attention import GatedDeltaNetSizes

from .conftest import assert_rel_close
from .test_linear_attention import float64_parameters, left_padding_mask, module, reference_forward, transformers_pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZES = GatedDeltaNetSizes(hidden_size=256, num_key_heads=2, num_value_heads=4, key_head_dim=128, value_head_dim=128,
                           conv_kernel_size=4, norm_eps=1e-6, chunk_size=64)


def test_cuda_equals_the_definition_and_transformers():
    """150 left-padded tokens (three chunks, the last partial) in float32 against the float64 definition on the CPU
    and transformers' mixer on the GPU; bfloat16 within its rounding of the definition."""
    torch.manual_seed(0)
    reference, ours, _ = transformers_pair("qwen3_next", SIZES)
    reference, ours = reference.cuda(), ours.cuda()
    x = torch.randn(2, 150, SIZES.hidden_size)
    mask = left_padding_mask(2, 150, [0, 37])
    with torch.no_grad():
        out = ours(x.cuda(), mask.cuda())
        expected = reference_forward(float64_parameters(ours), x, mask, SIZES)
        assert_rel_close(out.cpu().double(), expected, 1e-5, what="float64 definition")
        assert_rel_close(out, reference(x.cuda(), attention_mask=mask.cuda()), 1e-4, what="transformers")
        ours = ours.bfloat16()
        out = ours(x.cuda().bfloat16(), mask.cuda())
        expected = reference_forward(float64_parameters(ours), x.bfloat16(), mask, SIZES)
        assert_rel_close(out.cpu().double(), expected, 3e-2, what="bfloat16")


def test_cuda_inductor_fullgraph_equals_eager():
    """Inductor, `fullgraph=True`: a masked prefill forward and backward, then a cached prefill and three decode
    steps give eager's outputs, gradients and states."""
    torch.manual_seed(1)
    m = module(sizes=SIZES).cuda()
    x = torch.randn(2, 100, SIZES.hidden_size, device="cuda")
    mask = left_padding_mask(2, 100, [0, 9]).cuda()
    compiled = torch.compile(m, fullgraph=True)
    compiled(x, mask).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    m(x, mask).square().sum().backward()
    for name, p in m.named_parameters():
        assert_rel_close(grads[name], p.grad, 1e-4, what=name)
    eager_layer, compiled_layer = LinearAttentionLayer(), LinearAttentionLayer()
    with torch.no_grad():
        for t in [slice(0, 97), slice(97, 98), slice(98, 99), slice(99, 100)]:
            assert_rel_close(compiled(x[:, t], cache_layer=compiled_layer), m(x[:, t], cache_layer=eager_layer),
                             1e-4, what=f"tokens {t.start}:{t.stop}")
    assert_rel_close(compiled_layer.recurrent_states[0], eager_layer.recurrent_states[0], 1e-4)
