"""The experts plan, decided on the host from shapes and flags alone: which calls take the decode kernels and
hf-moe's own GEMMs, and `override_plan` forcing fields inside its block only (checked on CPU tensors)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from .experts_cases import make_experts


def test_decode_kernels_are_chosen_from_shapes_and_flags_alone():
    """Which calls take the decode kernels (decided on the host, so CUDA graphs and torch.compile see one path):
    half-precision SiLU experts, nothing that needs a gradient, at most `DECODE_ROWS_PER_EXPERT` rows per expert on
    average. Checked on CPU tensors planned as if the Triton kernels served them; the kernels themselves are tested on
    the GPU."""
    from hf_moe.moe.experts.plan import DECODE_ROWS_PER_EXPERT, override_plan, plan_experts

    experts = make_experts(16, 24, 8, 2, dtype=torch.bfloat16)
    gelu = make_experts(16, 24, 8, 2, act="gelu", dtype=torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    weights = torch.rand(5, 2, dtype=torch.bfloat16)
    limit = DECODE_ROWS_PER_EXPERT * experts.num_experts

    def decodes(experts, x, weights, num_rows):
        return plan_experts(experts, x, weights, num_rows).decode

    with override_plan(triton=True):
        with torch.no_grad():
            assert decodes(experts, x, weights, limit)
            assert not decodes(experts, x, weights, limit + 1)
            assert not decodes(gelu, x, weights, 10)  # another activation
        assert not decodes(experts, x, weights, 10)  # the expert weights require grad
        with torch.inference_mode():
            assert decodes(experts, x, weights, 10)
        experts.requires_grad_(False)
        assert decodes(experts, x, weights, 10)
        assert not decodes(experts, x.requires_grad_(True), weights, 10)
        with torch.no_grad():
            assert not decodes(experts.float(), x.float(), weights.float(), 10)


def test_own_gemms_are_chosen_from_shapes_and_flags_alone(monkeypatch):
    """Which GEMMs run as hf-moe's Triton kernels (decided on the host): few rows per expert, enough multiply-adds,
    whether or not torch.compile traces. Checked on CPU tensors planned as if torch's grouped GEMM and the Triton
    kernels served them: the gate/up GEMM of `rows` rows of 3 experts, `[rows, 6] @ [3, 6, 2·inter]`."""
    from hf_moe.moe.experts.plan import override_plan, plan_experts

    def own(rows, inter=4):
        experts = SimpleNamespace(config=SimpleNamespace(hidden_act="silu"), gate_up_proj=torch.empty(3, 2 * inter, 6),
                                  down_proj=torch.empty(3, 6, inter))
        return plan_experts(experts, torch.empty(1, 6), torch.empty(1, 2), rows).gate_up_gemm == "triton"

    with override_plan(triton=True, grouped_mm=True, own_gemm_rows_per_expert=4, own_gemm_min_multiply_adds=10 * 6 * 8):
        assert own(12)
        assert own(10)
        assert not own(13)  # more than 4 rows per expert
        assert not own(9)  # too few multiply-adds
        assert not own(12, inter=3)  # too few multiply-adds
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert own(12)  # torch.compile traces the Triton GEMM as the custom op hf_moe::grouped_mm


def test_override_plan_forces_fields_inside_the_block_only():
    from hf_moe.moe.experts.plan import override_plan, plan_experts

    experts = make_experts()
    x, weights = torch.randn(3, experts.hidden_dim, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    before = plan_experts(experts, x, weights, 6)
    assert before.gate_up_gemm == before.down_gemm == "per_expert" and not before.decode  # CPU
    with override_plan(decode=True, down_gemm="grouped_mm"):
        forced = plan_experts(experts, x, weights, 6)
        assert forced.decode and forced.down_gemm == "grouped_mm" and forced.gate_up_gemm == "per_expert"
    assert plan_experts(experts, x, weights, 6) == before
    with pytest.raises(ValueError, match="unknown names \\['decodes'\\]"):
        with override_plan(decodes=True):
            pass
