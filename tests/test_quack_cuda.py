"""The quack backend of the experts' weight gradients on the GPU (run on the device machine; skipped without CUDA
or quack): with quack the experts' forward and backward compute what they compute without it (bf16, against a
float64 reference), idle experts get exactly zero weight gradient, deferral changes nothing, and the MoE block
compiles as one graph through `hf_moe::quack_weight_grad`."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_moe.moe.block import HfMoeSparseMoeBlock
from hf_moe.moe.experts import grouped_experts_forward
from hf_moe.moe.experts.plan import override_plan, plan_experts
from hf_moe.moe.kernels import quack_gemm
from hf_moe.parallel.weight_grad_queue import WeightGradQueue

from .conftest import rel_err
from .experts_cases import make_experts, make_routing, reference
from .test_compile_cuda import cuda_block, forward_backward

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and quack_gemm.available()),
                                reason="needs a Hopper (or newer) GPU and quack-kernels")
BF16_TOL = 3e-2
NUM_EXPERTS, TOKENS = 16, 256


def setup():
    """bf16 experts at widths quack's TMA accepts, skewed routing: experts 12-15 get no rows, ~10% slots dropped."""
    torch.manual_seed(0)
    experts = make_experts(hidden=256, inter=128, experts=NUM_EXPERTS, top_k=2, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(TOKENS, NUM_EXPERTS, 2, "skewed", device="cuda", dtype=torch.float32)
    x = torch.randn(TOKENS, 256, device="cuda", dtype=torch.bfloat16)
    idle = sorted(set(range(NUM_EXPERTS)) - set(index[index < NUM_EXPERTS].tolist()))
    return experts, index, weights, x, idle


def grads(experts, index, weights, x, weight_grads=None, fn=grouped_experts_forward):
    """Output and the gradients w.r.t. x, weights, gate_up_proj and down_proj of a fixed projection of the output
    (the projection of `experts_cases.reference`, the float64 reference loop on the CPU)."""
    experts.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    weights = weights.detach().requires_grad_(True)
    out = fn(experts, x, index, weights, weight_grads=weight_grads)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * probe.to(out.device)).sum().backward()
    return [out.detach(), x.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


def test_quack_weight_grads_equal_torchs_and_the_float64_reference():
    experts, index, weights, x, idle = setup()
    assert idle, "the routing must leave some experts idle"
    plan = plan_experts(experts, x, weights, index.numel())
    assert plan.weight_grad_gemm == "quack"
    got = grads(experts, index, weights, x)
    with override_plan(quack=False):
        torchs = grads(experts, index, weights, x)
    want = reference(experts, x, index, weights)
    names = ["out", "d_x", "d_weights", "d_gate_up_proj", "d_down_proj"]
    for name, g, t, w in zip(names, got, torchs, want):
        g, t, w = g.cpu().double(), t.cpu().double(), w.detach().cpu().double()  # the reference ran on the CPU
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) <= max(2 * rel_err(t, w), 1e-2), (name, rel_err(g, w), rel_err(t, w))
    for name, g in zip(names[3:], got[3:]):
        assert torch.equal(g[idle], torch.zeros_like(g[idle])), f"{name}: idle experts' gradient not zero"
    deferred = grads(experts, index, weights, x, weight_grads=WeightGradQueue())
    for name, g, d in zip(names, got, deferred):
        assert torch.equal(g, d), f"{name}: deferred differs"


def _profiled_ops(run) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = run()
        torch.cuda.synchronize()
    return result, {event.key for event in prof.key_averages()}


def test_compiled_experts_run_the_quack_op_fullgraph_and_equal_eager():
    experts, index, weights, x, idle = setup()
    torch._dynamo.reset()
    compiled = torch.compile(grouped_experts_forward, fullgraph=True)
    want = grads(experts, index, weights, x)
    got, ops = _profiled_ops(lambda: grads(experts, index, weights, x, fn=compiled))
    assert "hf_moe::quack_weight_grad" in ops, sorted(op for op in ops if "hf_moe" in op)
    for g, w in zip(got, want):
        assert rel_err(g, w) < BF16_TOL
    assert torch.equal(got[3][idle], torch.zeros_like(got[3][idle]))


def test_compiled_block_with_quack_equals_the_eager_block_without_it():
    block = cuda_block().train()
    assert isinstance(block, HfMoeSparseMoeBlock)
    x = torch.randn(4, 64, block.experts.hidden_dim, device="cuda", dtype=torch.bfloat16)
    with override_plan(quack=False):
        want = forward_backward(block, x)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True)
    got, ops = _profiled_ops(lambda: forward_backward(compiled, x))
    assert "hf_moe::quack_weight_grad" in ops
    names = ["out", "x.grad", *(n for n, _ in block.named_parameters())]
    for name, g, w in zip(names, got, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < BF16_TOL, (name, rel_err(g, w))
