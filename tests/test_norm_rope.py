"""Qwen3's q/k norm followed by RoPE in one kernel each way (`hf_moe.moe.kernels.norm_rope`), and its place in
`HfMoeAttention`.

Kernel tests run on a CUDA device, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with Triton
installed), and skip otherwise: output, input gradient and weight gradient against transformers' `LlamaRMSNorm` and
`apply_rotary_pos_emb` in float64, for cosines shared by the batch or per sequence, an upstream gradient laid out as
SDPA returns it (`[B, H, S, D]` memory), a row count that is not a multiple of the block, fp32 and bf16; the same
under torch.compile(fullgraph=True). CPU tests (CI): which attention layers take the kernel. CUDA tests: the model's
training step with the kernel equals the one with torch's operators (forward, every parameter's gradient; float32),
eager and compiled, and the compiled graph calls the two ops once per layer each.
"""

from __future__ import annotations

import importlib.util
import os
from unittest import mock

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

import hf_moe.attention
from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.attention import HfMoeAttention

from .conftest import aot_graph_backend, rel_err, requires_cuda, tiny_config

CUDA = torch.cuda.is_available()
requires_kernels = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
"""Relative error against float64: float32 arithmetic, and for bf16 the one rounding of each output."""


def _reference(x, norm, cos, sin):
    """transformers' q norm then RoPE (Qwen3's order) in float64: `[B, S, H, D]` in, `[B, S, H, D]` out."""
    normed = norm(x).transpose(1, 2)
    rotated, _ = apply_rotary_pos_emb(normed, normed, cos.double(), sin.double())
    return rotated.transpose(1, 2)


def _cos_sin(batch, seq, dim, dtype):
    angles = torch.rand(batch, seq, dim // 2, device=DEVICE) * 6.3
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cos_batch", [1, 3])
@pytest.mark.parametrize(
    "launch",  # (forward rows, warps; backward rows, chunks, warps): the defaults and two other shapes
    [None, (4, 1, 32, 4, 4), (32, 8, 4, 2, 1)],
)
def test_norm_rope_matches_float64_llama_norm_and_rope(monkeypatch, dtype, cos_batch, launch):
    from hf_moe.moe.kernels import norm_rope as module
    from hf_moe.moe.kernels.norm_rope import norm_rope

    if launch is not None:
        names = ("_FWD_ROWS", "_FWD_WARPS", "_BWD_ROWS", "_BWD_CHUNKS", "_BWD_WARPS")
        for name, value in zip(names, launch):
            monkeypatch.setattr(module, name, value)
    torch.manual_seed(0)
    batch, seq, heads, dim = 3, 7, 5, 32  # 105 rows: no multiple of any block's rows
    x = (torch.randn(batch, seq, heads * dim, device=DEVICE) * 3).to(dtype).view(batch, seq, heads, dim)
    weight = (1 + 0.3 * torch.randn(dim, device=DEVICE)).to(dtype)
    cos, sin = _cos_sin(cos_batch, seq, dim, dtype)
    # the gradient SDPA returns for queries [B, H, S, D]: contiguous in that order, a transposed view here
    grad = torch.randn(batch, heads, seq, dim, device=DEVICE).to(dtype).transpose(1, 2)
    x_, w_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = norm_rope(x_, w_, cos, sin, 1e-6)
    out.backward(grad)
    x64 = x.double().requires_grad_()
    norm = LlamaRMSNorm(dim, eps=1e-6).to(DEVICE, torch.float64)
    norm.weight.data.copy_(weight)
    ref = _reference(x64, norm, cos, sin)
    ref.backward(grad.double())
    assert out.dtype == dtype and out.is_contiguous() and out.shape == x.shape
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(x_.grad, x64.grad) < TOL[dtype]
    assert rel_err(w_.grad, norm.weight.grad) < TOL[dtype]


@requires_kernels
def test_norm_rope_compiled_fullgraph_equals_eager():
    """Traced, the autograd.Function's forward and backward are the two custom ops (their fake shapes and dtypes are
    what the launchers return), with no graph break."""
    from hf_moe.moe.kernels.norm_rope import norm_rope

    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 32, device=DEVICE, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(32, device=DEVICE)).requires_grad_()
    cos, sin = _cos_sin(1, 5, 32, torch.float32)
    grad = torch.randn(2, 3, 5, 32, device=DEVICE)

    def queries(x, weight):
        return norm_rope(x, weight, cos, sin, 1e-6).transpose(1, 2)

    want = queries(x, weight)
    want_grads = torch.autograd.grad(want, (x, weight), grad)
    torch._dynamo.reset()
    got = torch.compile(queries, fullgraph=True)(x, weight)
    got_grads = torch.autograd.grad(got, (x, weight), grad)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@requires_kernels
def test_norm_rope_rejects_bad_shapes():
    from hf_moe.moe.kernels.norm_rope import norm_rope

    x = torch.randn(2, 3, 4, 24, device=DEVICE)
    cos = torch.randn(1, 3, 24, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        norm_rope(x, torch.ones(24, device=DEVICE), cos, cos, 1e-6)
    with pytest.raises(ValueError, match=r"cos/sin \[B or 1, S, D\]"):
        norm_rope(x[..., :16], torch.ones(16, device=DEVICE), cos, cos, 1e-6)
    x, weight = x[..., :16], torch.ones(16, device=DEVICE)
    cos = cos[..., :16]
    for bad_cos, bad_sin in [(cos[:, :2], cos[:, :2]),  # shorter than the sequence: read past its end
                             (cos.expand(3, -1, -1), cos.expand(3, -1, -1)),  # neither 1 nor the batch
                             (cos, cos[:, :2])]:  # sin not cos's shape
        with pytest.raises(ValueError, match=r"cos/sin \[B or 1, S, D\]"):
            norm_rope(x, weight, bad_cos, bad_sin, 1e-6)
    norm_rope(x, weight, cos.expand(2, -1, -1), cos.expand(2, -1, -1), 1e-6)  # per sequence: accepted


@pytest.mark.parametrize(
    ("fields", "fusable"),
    [
        (dict(qk_norm=True), True),
        (dict(qk_norm=False), False),
        (dict(qk_norm=True, qk_norm_scope="projection"), False),
        (dict(qk_norm=True, qk_norm_order="after_rope"), False),
        (dict(qk_norm=True, rope_interleave=True), False),
        (dict(qk_norm=True, rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
         False),
    ],
)
def test_attention_takes_the_kernel_only_for_norm_then_full_rope(fields, fusable):
    config = HfMoeConfig(**{**tiny_config().to_dict(), **fields})
    attention = HfMoeAttention(config, 0)
    assert attention.norm_rope_fusable is fusable
    states, cos = torch.randn(1, 2, 8), torch.randn(1, 2, config.head_dim)
    assert attention.fuses_norm_rope(states, cos) is False  # never on the CPU


def _training_step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@requires_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_model_with_the_kernel_equals_torch_ops(compiled):
    # float32: the two paths then differ by rounding only, too little to change any token's experts
    torch.manual_seed(0)
    config = tiny_config(qk_norm=True, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    model = HfMoeForCausalLM(config).cuda()
    ids = torch.randint(0, config.vocab_size, (2, 24), device="cuda")
    assert all(layer.self_attn.fuses_norm_rope(torch.ones(1, device="cuda"), torch.ones(1, 1, 64))
               for layer in model.model.layers)
    run = torch.compile(model) if compiled else model
    logits, grads = _training_step(run, ids)
    with mock.patch.object(hf_moe.attention, "FUSED_NORM_ROPE", False):
        ref_logits, ref_grads = _training_step(run, ids)
    assert rel_err(logits, ref_logits) < 1e-4
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-3, name


@requires_cuda
def test_cuda_compiled_graph_calls_the_ops_once_per_layer():
    config = tiny_config(qk_norm=True, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
    model = HfMoeForCausalLM(config).cuda().to(torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (2, 16), device="cuda")
    backend, graphs = aot_graph_backend()
    torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, labels=ids).loss.backward()
    targets = [str(node.target) for graph in graphs["forward"] + graphs["backward"] for node in graph.nodes
               if node.op == "call_function"]
    layers = config.num_hidden_layers
    assert targets.count("hf_moe.norm_rope.default") == 2 * layers, targets  # queries and keys
    assert targets.count("hf_moe.norm_rope_backward.default") == 2 * layers, targets
