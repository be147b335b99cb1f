"""hf-moe's own persistent grouped GEMMs (CUDA, Hopper or newer: TMA) against a float64 loop and torch's
grouped GEMMs: both weight layouts, the fused gate/up + SwiGLU, no host sync, determinism.

They skip without a GPU with TMA (sm90+) and run on the device machine
(`python -m pytest tests/test_experts_own_gemms_cuda.py`).
"""

from __future__ import annotations

import pytest
import torch

from hf_moe.moe.experts import grouped_experts_forward

from .experts_cases import NAMES, forward_and_grads, make_experts, make_routing, reference, rel_err

requires_tma = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs a GPU with TMA (sm90+)"
)


def _loop_grouped_mm(a, b, offsets):
    """The float64 loop: rows of expert e = a_e @ b[e]; rows past offsets[-1] stay zero."""
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float64)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        out[start:end] = a[start:end].cpu().double() @ b[expert].cpu().double()
        start = end
    return out


# Rows per expert: idle experts, several 128-row tiles, a single row, one expert with every row, a single expert.
OFFSET_CASES = [[7, 0, 300, 1, 0, 19], [0, 0, 0, 513], [150]]


def _limit_programs(monkeypatch, programs: int | None) -> None:
    """Run the persistent kernels on `programs` programs (None: one per SM), so that each walks several tiles."""
    from hf_moe.moe.kernels import grouped_gemm

    if programs is not None:
        monkeypatch.setattr(grouped_gemm, "_num_sms", lambda device_index: programs)


@requires_tma
@pytest.mark.parametrize("programs", [None, 1, 3])
@pytest.mark.parametrize("counts", OFFSET_CASES)
@pytest.mark.parametrize("layout", ["k_major", "row_major"])
def test_cuda_own_grouped_mm_matches_float64_loop(monkeypatch, counts, layout, programs):
    """Both weight layouts the experts use (stored `[E, N, K]` read transposed, and row-major `[E, K, N]` in
    backward), at sizes that are not multiples of the tiles, with one program per SM and with a few programs that
    each walk several tiles. An idle expert's weights are NaN: a tile that read another expert's weights would
    spread them."""
    from hf_moe.moe.kernels import grouped_gemm

    _limit_programs(monkeypatch, programs)
    K, N = 72, 520  # three column blocks, the last partial
    offsets = torch.tensor(counts).cumsum(0).to(device="cuda", dtype=torch.int32)
    num_valid = int(offsets[-1])
    a = torch.randn(num_valid + 5, K, device="cuda", dtype=torch.bfloat16)  # 5 dropped rows
    shape = (len(counts), N, K) if layout == "k_major" else (len(counts), K, N)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) / K**0.5
    idle = [e for e, c in enumerate(counts) if c == 0]
    w[idle] = float("nan")
    b = w.transpose(1, 2) if layout == "k_major" else w
    assert grouped_gemm.supports(a, b)
    got = grouped_gemm.grouped_mm(a, b, offsets)[:num_valid].double().cpu()
    want = _loop_grouped_mm(a, b, offsets)[:num_valid]
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-2


@requires_tma
@pytest.mark.parametrize("one_acc_max_k", [4096, 0])  # one accumulator (default at these widths), two
@pytest.mark.parametrize("programs", [None, 1, 3])
@pytest.mark.parametrize("counts", OFFSET_CASES)
def test_cuda_own_gate_up_swiglu_matches_float64_loop_and_the_unfused_kernels(
    monkeypatch, counts, programs, one_acc_max_k
):
    from hf_moe.moe.kernels import grouped_gemm, swiglu

    _limit_programs(monkeypatch, programs)
    monkeypatch.setattr(grouped_gemm, "ONE_ACCUMULATOR_MAX_K", one_acc_max_k)
    hidden, inter = 72, 300  # three column blocks, the last partial
    offsets = torch.tensor(counts).cumsum(0).to(device="cuda", dtype=torch.int32)
    num_valid = int(offsets[-1])
    x = torch.randn(num_valid + 5, hidden, device="cuda", dtype=torch.bfloat16)
    gate_up_proj = torch.randn(len(counts), 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    weight = torch.rand(num_valid + 5, device="cuda")
    gate_up, act = grouped_gemm.gate_up_swiglu(x, gate_up_proj, weight, offsets)
    want = _loop_grouped_mm(x, gate_up_proj.transpose(1, 2), offsets)[:num_valid]
    gate, up = want.chunk(2, dim=-1)
    want_act = torch.nn.functional.silu(gate) * up * weight[:num_valid, None].double().cpu()
    assert rel_err(gate_up[:num_valid].double().cpu(), want) < 1e-2
    assert rel_err(act[:num_valid].double().cpu(), want_act) < 1e-2
    # the activation is the unfused kernel's on the stored (rounded) projection, which backward recomputes
    unfused = swiglu.swiglu_forward(gate_up, weight, offsets)
    torch.testing.assert_close(act[:num_valid], unfused[:num_valid], rtol=1e-2, atol=1e-3)


@requires_tma
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_cuda_own_gemms_serve_few_rows_per_expert_and_match_torch_gemms(monkeypatch, kind):
    """Where the plan chooses them, forward and backward take the Triton GEMMs (the gate/up one fused with
    SwiGLU) and agree with the same path on torch's grouped GEMM; above `own_gemm_rows_per_expert` they are not
    called."""
    from hf_moe.moe.experts.plan import override_plan
    from hf_moe.moe.kernels import grouped_gemm

    calls = []

    def counting(name, kernel):
        def call(*args):
            calls.append(name)
            return kernel(*args)

        return call

    for name in ("grouped_mm", "gate_up_swiglu"):
        monkeypatch.setattr(grouped_gemm, name, counting(name, getattr(grouped_gemm, name)))
    experts = make_experts(256, 384, 16, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(700, 16, 4, kind, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16)
    with override_plan(own_gemm_min_multiply_adds=0):  # these test experts are small
        own = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    assert calls == ["gate_up_swiglu", "grouped_mm", "grouped_mm", "grouped_mm"], calls
    calls.clear()
    with override_plan(own_gemm_min_multiply_adds=0, own_gemm_rows_per_expert=700 * 4 // 16 - 1):
        torch_gemms = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    assert calls == []
    want = reference(experts, x, index, weights)
    for name, o, t, w in zip(NAMES, own, torch_gemms, want):
        assert torch.isfinite(o).all(), name
        assert rel_err(o, t) < 1e-2, (name, rel_err(o, t))
        assert rel_err(o, w) < max(1e-2, 1.5 * rel_err(t, w)), (name, rel_err(o, w), rel_err(t, w))


@requires_tma
def test_cuda_own_gemms_no_host_sync_and_deterministic():
    from hf_moe.moe.experts.plan import override_plan

    with override_plan(own_gemm_min_multiply_adds=0):
        _own_gemms_no_host_sync_and_deterministic()


def _own_gemms_no_host_sync_and_deterministic():
    from hf_moe.moe.experts.plan import plan_experts
    from hf_moe.moe.kernels import grouped_gemm

    experts = make_experts(256, 384, 16, 8, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(1024, 16, 8, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    assert plan_experts(experts, x, weights, 1024 * 8).gate_up_gemm == "triton"
    assert grouped_gemm.supports(x.new_empty(1024 * 8, 256), experts.gate_up_proj.transpose(1, 2))
    first = forward_and_grads(grouped_experts_forward, experts, x, index, weights)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xg, wg = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        grouped_experts_forward(experts, xg, index, wg).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    second = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@requires_tma
def test_cuda_own_gemms_take_expert_weights_stored_transposed():
    """Expert weights whose storage is `[E, K, N]` (a transposed view of the usual `[E, N, K]`, as a converter or an
    adapter may hand over) run through the same path and give the same results."""
    from hf_moe.moe.experts.plan import override_plan

    with override_plan(own_gemm_min_multiply_adds=0):
        _own_gemms_take_expert_weights_stored_transposed()


def _own_gemms_take_expert_weights_stored_transposed():
    experts = make_experts(256, 384, 16, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(500, 16, 4, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(500, 256, device="cuda", dtype=torch.bfloat16)
    want = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            stored = getattr(experts, name).detach().transpose(1, 2).contiguous().transpose(1, 2)
            setattr(experts, name, torch.nn.Parameter(stored))
    assert experts.gate_up_proj.stride(1) == 1
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-2, (name, rel_err(g, w))
