"""The grouped experts path on CUDA against the float64 reference loop: bf16 and float32, skewed routing,
a known slot count, no host sync, determinism, the Triton kernels against their torch fallbacks, the in-place
SwiGLU backward, and torch.compile.

CUDA tests skip without a GPU and run on the device machine (`python -m pytest tests/test_experts_grouped_cuda.py`).
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_moe.moe.experts import grouped_experts_forward

from .conftest import requires_cuda
from .experts_cases import NAMES, forward_and_grads, make_experts, make_routing, mostly_elsewhere, reference, rel_err


@requires_cuda
@pytest.mark.parametrize("shape", [(256, 384, 16, 4), (512, 1024, 8, 2), (128, 200, 5, 2)])
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_cuda_bf16_matches_float32_reference(shape, kind):
    """bf16 on the GPU against the float64 loop; the error must be bf16-sized and no larger than transformers'
    own grouped_mm's error on the same inputs."""
    hidden, inter, num_experts, top_k = shape
    experts = make_experts(hidden, inter, num_experts, top_k, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(333, num_experts, top_k, kind, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(333, hidden, device="cuda", dtype=torch.bfloat16)
    want = reference(experts, x, index, weights)
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    peer = forward_and_grads(ALL_EXPERTS_FUNCTIONS["grouped_mm"], experts, x, index, weights)
    for name, g, p, w in zip(NAMES, got, peer, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < max(1e-2, 1.5 * rel_err(p, w)), (name, rel_err(g, w), rel_err(p, w))
    if kind == "skewed":
        idle = torch.ones(num_experts, dtype=torch.bool)
        idle[index[index < num_experts].unique().cpu()] = False
        assert idle.any()
        assert got[3][idle].abs().max() == 0 and got[4][idle].abs().max() == 0


@requires_cuda
def test_cuda_known_slot_count_matches_reference():
    experts = make_experts(256, 384, 16, 8, dtype=torch.bfloat16, device="cuda")
    index, weights, num_slots = mostly_elsewhere(500, 16, 8, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(500, 256, device="cuda", dtype=torch.bfloat16)
    want = reference(experts, x, index, weights)
    full = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    got = forward_and_grads(functools.partial(grouped_experts_forward, num_slots=num_slots), experts, x, index, weights)
    for name, g, f, w in zip(NAMES, got, full, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < max(1e-2, 1.5 * rel_err(f, w)), (name, rel_err(g, w), rel_err(f, w))


@requires_cuda
def test_cuda_float32_matches_reference():
    experts = make_experts(64, 96, 6, 2, dtype=torch.float32, device="cuda")
    index, weights = make_routing(100, 6, 2, "skewed", device="cuda", dtype=torch.float32)
    x = torch.randn(100, 64, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    want = reference(experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-5, name


@requires_cuda
def test_cuda_no_host_sync_and_deterministic():
    # 1024 tokens × 8 slots: past the 4096 rows where torch.sort switches from its in-place kernel to cub.
    experts = make_experts(256, 384, 16, 8, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(1024, 16, 8, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    forward_and_grads(grouped_experts_forward, experts, x, index, weights)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xg, wg = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        out = grouped_experts_forward(experts, xg, index, wg)
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    first = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    second = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@requires_cuda
def test_cuda_triton_kernels_match_torch_fallbacks():
    from hf_moe.moe.experts import grouped as backend
    from hf_moe.moe.kernels import gather, swiglu

    rows, inter, hidden = 300, 200, 96
    offsets = torch.tensor([40, 40, 150, 260], device="cuda", dtype=torch.int32)  # rows 260.. are dropped
    gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(rows, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    act = torch.nn.SiLU()
    valid = slice(0, 260)
    ref_h = backend._gated_act(gate_up.float(), weight.float(), offsets, act, False)
    fused = swiglu.swiglu_forward(gate_up, weight, offsets)[valid].float()
    torch.testing.assert_close(fused, ref_h[valid], rtol=2e-2, atol=1e-2)
    d_gu, d_w, h = swiglu.swiglu_backward(gate_up, weight, grad, offsets, True)
    r_gu, r_w, r_h = backend._gated_act_backward(
        gate_up.float(), weight.float(), grad.float(), offsets, act, False, True
    )
    torch.testing.assert_close(d_gu[valid].float(), r_gu[valid], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(d_w[valid], r_w[valid], rtol=1e-3, atol=1e-3)
    assert torch.equal(d_w[260:], torch.zeros_like(d_w[260:]))
    torch.testing.assert_close(h[valid].float(), r_h[valid], rtol=2e-2, atol=1e-2)
    table = torch.randn(77, hidden, device="cuda", dtype=torch.bfloat16)
    token = torch.randint(0, 77, (rows,), device="cuda")
    assert torch.equal(gather.gather_rows(table, token, offsets)[valid], table[token][valid])
    num_tokens, top_k = 150, 2
    src = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    src[260:] = float("nan")  # dropped rows must never be read
    position = torch.randperm(rows, device="cuda")
    out = gather.gather_sum(src, position, offsets, num_tokens)
    rows_ = src.float()[position].view(num_tokens, top_k, hidden)
    want = torch.where((position < 260).view(num_tokens, top_k, 1), rows_, 0).sum(1)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
    # strided rows (the expert-parallel dispatcher packs routing bytes after each token's H values)
    wide = torch.randn(rows, hidden + 24, device="cuda", dtype=torch.bfloat16)
    strided_out = torch.full((rows, hidden + 8), 7.0, device="cuda", dtype=torch.bfloat16)
    gather.gather_rows(wide[:77, :hidden], token, offsets, out=strided_out[:, :hidden])
    assert torch.equal(strided_out[valid, :hidden], wide[:77, :hidden][token][valid])
    assert (strided_out[:, hidden:] == 7).all() and (strided_out[260:] == 7).all(), "wrote outside its rows"
    wide[:, :hidden] = src
    assert torch.equal(gather.gather_sum(wide[:, :hidden], position, offsets, num_tokens), out)


@requires_cuda
def test_cuda_in_place_swiglu_backward_equals_the_out_of_place_kernel():
    from hf_moe.moe.kernels import swiglu

    rows, inter = 300, 200
    offsets = torch.tensor([90, 90, 270], device="cuda", dtype=torch.int32)  # rows 270.. are dropped
    gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(rows, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    want = swiglu.swiglu_backward(gate_up, weight, grad, offsets, True)
    gate_up_buffer, grad_buffer = gate_up.clone(), grad.clone()
    got = swiglu.swiglu_backward(gate_up_buffer, weight, grad_buffer, offsets, True, in_place=True)
    assert got[0].data_ptr() == gate_up_buffer.data_ptr() and got[2].data_ptr() == grad_buffer.data_ptr()
    valid = slice(0, 270)
    for name, g, w in zip(("d_gate_up", "d_weight", "recomputed"), got, want):
        assert torch.equal(g[valid], w[valid]), name


@requires_cuda
def test_cuda_backward_frees_the_saved_gate_up_and_refuses_a_second_backward(monkeypatch):
    """The SwiGLU backward writes its gradient over the saved gate/up projection: the fwd+bwd peak drops by about
    one `[S, 2I]` tensor, and a retain_graph second backward fails loudly instead of reading gradients. Enough
    tokens that the down node's backward (where the SwiGLU backward runs) holds the peak, not the gate/up node's
    weight gradient `[E, 2I, H]`."""
    tokens, hidden, inter, num_experts, top_k = 8192, 1024, 4096, 8, 2
    experts = make_experts(hidden, inter, num_experts, top_k, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(tokens, num_experts, top_k, "uniform", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def peak_bytes() -> int:
        experts.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grouped_experts_forward(experts, x, index, weights).float().square().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    grads = []
    in_place = peak_bytes()
    grads.append([experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone(), x.grad.clone()])
    x.grad = None
    with monkeypatch.context() as patch:  # the traced (torch.compile) branch keeps the buffer
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        out_of_place = peak_bytes()
    grads.append([experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone(), x.grad.clone()])
    for got, want in zip(*grads):
        assert torch.equal(got, want)
    gate_up_bytes = tokens * top_k * 2 * inter * 2
    assert out_of_place - in_place >= 0.9 * gate_up_bytes, (out_of_place, in_place, gate_up_bytes)
    out = grouped_experts_forward(experts, x, index, weights).float().square().sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()


@requires_cuda
def test_cuda_compiled_fullgraph_matches_eager():
    """torch.compile traces the whole CUDA path (autograd Function, Triton kernels, grouped GEMMs) without a graph
    break; it runs the out-of-place backward, eager the in-place one: same results."""
    experts = make_experts(256, 384, 16, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(700, 16, 4, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(grouped_experts_forward, fullgraph=True)
    want = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    got = forward_and_grads(compiled, experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-3, (name, rel_err(g, w))
