"""The optional quack backend of the experts' weight gradients, on the CPU: which plans take it, the call it makes
(checked against an emulation of quack's documented varlen-K semantics, since quack itself needs a Hopper GPU),
and that hf-moe never needs quack installed. The GPU checks are in tests/test_quack_cuda.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hf_moe.moe import kernels
from hf_moe.moe.experts import grouped_experts_forward
from hf_moe.moe.experts.plan import override_plan, plan_experts
from hf_moe.moe.kernels import quack_gemm
from hf_moe.parallel.weight_grad_queue import WeightGradQueue

from .conftest import rel_err
from .experts_cases import NAMES, forward_and_grads, make_experts, make_routing, reference


def _plan(experts, **changes):
    x = torch.randn(3, experts.hidden_dim, dtype=experts.down_proj.dtype)
    with override_plan(**changes):
        return plan_experts(experts, x, torch.rand(3, 2, dtype=x.dtype), 6)


def test_plan_takes_quack_for_the_weight_gradients_only_where_enabled_and_torch_grouped_gemm_would_run(monkeypatch):
    experts = make_experts(dtype=torch.bfloat16)
    assert _plan(experts).weight_grad_gemm == "per_expert"  # CPU: no grouped GEMM, so no quack either
    forced = _plan(experts, grouped_mm=True, quack=True)
    assert forced.weight_grad_gemm == "quack"
    assert forced.gate_up_gemm == forced.down_gemm == "grouped_mm"  # never the forward or input-gradient GEMMs
    assert _plan(experts, grouped_mm=True, quack=False).weight_grad_gemm == "grouped_mm"
    assert _plan(experts, grouped_mm=False, quack=True).weight_grad_gemm == "per_expert"
    # None (the default) asks `available()` only for CUDA bf16 tensors: a CPU tensor never takes quack
    monkeypatch.setattr(quack_gemm, "available", lambda: True)
    assert _plan(experts, grouped_mm=True).weight_grad_gemm == "grouped_mm"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine without CUDA")
def test_available_is_false_without_a_gpu():
    assert quack_gemm.available() is False


def _quack_emulation(calls: list):
    """quack's `gemm` with `cu_seqlens_k`, as its documentation states it, in float64: `out[i] = A[:, cu[i]:cu[i+1]]
    @ B[cu[i]:cu[i+1]]`; it checks the operand layouts that quack's kernel requires."""

    def gemm(a, b, cu_seqlens_k, tuned):
        assert a.stride(0) == 1 and b.stride(1) == 1, "varlen K: A must be M-major, B N-major"
        assert cu_seqlens_k.dtype == torch.int32 and cu_seqlens_k[0] == 0 and not tuned
        bounds = cu_seqlens_k.tolist()
        calls.append(bounds)
        out = a.new_empty(len(bounds) - 1, a.shape[0], b.shape[1])
        for i in range(len(bounds) - 1):
            out[i] = a[:, bounds[i]: bounds[i + 1]] @ b[bounds[i]: bounds[i + 1]]
        return out

    return SimpleNamespace(gemm=gemm)


def test_weight_grad_reads_only_each_experts_rows(monkeypatch):
    """`out[e] = a_eᵀ @ b_e` against a float64 loop, with an idle expert and NaN rows past `offsets[-1]`."""
    calls = []
    monkeypatch.setattr(quack_gemm, "_quack", lambda: _quack_emulation(calls))
    offsets = torch.tensor([3, 3, 7, 12], dtype=torch.int32)
    a, b = torch.randn(15, 5, dtype=torch.float64), torch.randn(15, 4, dtype=torch.float64)
    a[12:], b[12:] = float("nan"), float("nan")
    got = kernels.quack_gemm.weight_grad(a, b, offsets)
    want = torch.zeros(4, 5, 4, dtype=torch.float64)
    for e, (start, end) in enumerate([(0, 3), (3, 3), (3, 7), (7, 12)]):
        for row in range(start, end):
            want[e] += torch.outer(a[row], b[row])
    assert calls == [[0, 3, 3, 7, 12]]
    assert rel_err(got, want) < 1e-12 and torch.equal(got[1], torch.zeros(5, 4, dtype=torch.float64))


@pytest.mark.parametrize("deferred", [False, True])
def test_block_backward_through_the_quack_weight_grad_equals_the_reference(monkeypatch, deferred):
    """The experts' backward with `weight_grad_gemm="quack"` (the emulation standing in for quack) returns, or
    defers, both weight gradients equal to the float64 reference loop; skewed routing leaves experts idle and drops
    slots."""
    calls = []
    monkeypatch.setattr(quack_gemm, "_quack", lambda: _quack_emulation(calls))
    experts = make_experts(top_k=2)
    index, weights = make_routing(31, experts.num_experts, 2, "skewed")
    x = torch.randn(31, experts.hidden_dim, dtype=torch.float64)
    queue = WeightGradQueue() if deferred else None

    def forward(experts, x, index, weights):
        return grouped_experts_forward(experts, x, index, weights, weight_grads=queue)

    with override_plan(weight_grad_gemm="quack"):
        got = forward_and_grads(forward, experts, x, index, weights)
    assert len(calls) == 2  # down, then gate/up
    for name, g, w in zip(NAMES, got, reference(experts, x, index, weights)):
        assert rel_err(g, w) < 1e-12, name


def test_fake_gives_the_weight_gradient_shape_without_running_quack():
    with FakeTensorMode():
        a = torch.empty(40, 12, dtype=torch.bfloat16)
        b = torch.empty(40, 7, dtype=torch.bfloat16)
        out = torch.ops.hf_moe.quack_weight_grad(a, b, torch.empty(5, dtype=torch.int32))
    assert out.shape == (5, 12, 7) and out.dtype == torch.bfloat16
    meta = torch.ops.hf_moe.quack_weight_grad(
        torch.empty(40, 12, device="meta"), torch.empty(40, 7, device="meta"),
        torch.empty(5, dtype=torch.int32, device="meta"),
    )
    assert meta.shape == (5, 12, 7) and meta.device.type == "meta"


def test_hf_moe_trains_without_quack_installed():
    """With quack made unimportable, hf-moe imports, its plans never ask for quack on the CPU, and a backward runs."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("quack", "cutlass"):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
import torch
import hf_moe
from hf_moe.moe.kernels import quack_gemm
from tests.experts_cases import make_experts, make_routing
from hf_moe.moe.experts import grouped_experts_forward
experts = make_experts()
index, weights = make_routing(9, experts.num_experts, 2, "uniform")
x = torch.randn(9, experts.hidden_dim, dtype=torch.float64)
grouped_experts_forward(experts, x, index, weights).sum().backward()
assert experts.down_proj.grad is not None
assert not any(m.split(".")[0] in ("quack", "cutlass") for m in sys.modules), "quack imported"
print("ok", quack_gemm.available())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "False"]
