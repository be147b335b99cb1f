"""The grouped experts path on CPU computes the function of the reference loop, with its gradients: float64
and float32, skewed routing, experts that receive no token, dropped (sentinel) slots, a known slot count; the
row ops it builds on; the model's default backend; no Triton import on the CPU path."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.moe.experts import grouped_experts_forward, sort_by_expert

from .experts_cases import NAMES, forward_and_grads, make_experts, make_routing, mostly_elsewhere, reference, rel_err


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_grouped_matches_reference_float64(kind, act):
    experts = make_experts(act=act)
    index, weights = make_routing(41, experts.num_experts, 2, kind)
    x = torch.randn(41, experts.hidden_dim, dtype=torch.float64)
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    want = reference(experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-12, name
    if kind == "skewed":
        idle = torch.ones(experts.num_experts, dtype=torch.bool)
        idle[index[index < experts.num_experts].unique()] = False
        assert idle.any()
        assert got[3][idle].abs().max() == 0 and got[4][idle].abs().max() == 0


def test_grouped_float32_within_design_tolerance():
    experts = make_experts(hidden=64, inter=96, experts=6, top_k=3, dtype=torch.float32)
    index, weights = make_routing(64, 6, 3, "skewed", dtype=torch.float32)
    x = torch.randn(64, 64)
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    want = reference(experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-5, name


def test_every_slot_dropped_and_no_tokens():
    experts = make_experts()
    x = torch.randn(5, experts.hidden_dim, dtype=torch.float64)
    index = torch.full((5, 2), experts.num_experts)
    out = grouped_experts_forward(experts, x, index, torch.zeros(5, 2, dtype=torch.float64))
    assert torch.equal(out, torch.zeros_like(out))
    empty = grouped_experts_forward(experts, x[:0], index[:0], torch.zeros(0, 2, dtype=torch.float64))
    assert empty.shape == (0, experts.hidden_dim)


def test_sort_by_expert_is_a_permutation_grouped_by_expert():
    num_experts, top_k = 7, 3
    index, _ = make_routing(50, num_experts, top_k, "skewed")
    token, order, position, offsets = sort_by_expert(index, num_experts)
    flat = index.reshape(-1)
    assert torch.equal(order[position], torch.arange(flat.numel()))
    assert torch.equal(token, order // top_k)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    assert torch.equal(offsets.long(), counts.cumsum(0))
    assert offsets.dtype == torch.int32
    assert torch.equal(flat[order][: offsets[-1]], torch.repeat_interleave(torch.arange(num_experts), counts))


def test_known_slot_count_sizes_buffers_to_the_real_slots():
    """`num_slots` (known under expert parallelism) keeps real rows + one dropped row and changes no result."""
    experts = make_experts(top_k=4)
    index, weights, num_slots = mostly_elsewhere(37, experts.num_experts, 4)
    token, order, position, offsets = sort_by_expert(index, experts.num_experts, num_slots)
    assert token.numel() == order.numel() == num_slots + 1 and offsets[-1] == num_slots
    real = index.reshape(-1) < experts.num_experts
    assert torch.equal(order[position[real]], torch.arange(index.numel())[real])
    assert (position[~real] == num_slots).all()
    x = torch.randn(37, experts.hidden_dim, dtype=torch.float64)
    got = forward_and_grads(functools.partial(grouped_experts_forward, num_slots=num_slots), experts, x, index, weights)
    want = reference(experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-12, name
    assert got[2][~real.view(37, 4)].abs().max() == 0, "sentinel slots get no routing-weight gradient"


def test_model_defaults_to_hf_moe_grouped_and_switches():
    cfg = HfMoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
    )
    model = HfMoeForCausalLM(cfg)
    assert model.config._experts_implementation == "hf_moe_grouped"
    assert "hf_moe_grouped" in ALL_EXPERTS_FUNCTIONS
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        fast = model(ids).logits
        model.set_experts_implementation("grouped_mm")
        assert model.config._experts_implementation == "grouped_mm"
        peer = model(ids).logits
    torch.testing.assert_close(fast, peer, rtol=1e-4, atol=1e-5)


def test_cpu_path_never_imports_triton_kernels():
    # a fresh interpreter: on a GPU machine the CUDA tests of this session import the kernels themselves
    code = (
        "import sys, torch; from tests.experts_cases import make_experts, make_routing; "
        "from hf_moe.moe.experts import grouped_experts_forward; experts = make_experts(); "
        "index, weights = make_routing(9, experts.num_experts, 2, 'uniform'); "
        "x = torch.randn(9, experts.hidden_dim, dtype=torch.float64); "
        "out = grouped_experts_forward(experts, x, index, weights); "
        "assert torch.isfinite(out).all(); "
        "print(any(m in sys.modules for m in ('hf_moe.moe.kernels.gather', 'hf_moe.moe.kernels.swiglu', "
        "'hf_moe.moe.kernels.grouped_gemm')))"
    )
    root = Path(__file__).resolve().parent.parent
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert loaded.stdout.strip() == "False"


def test_row_ops_skip_out_of_range_rows_like_a_loop():
    """`hf_moe.moe.ops` on CPU: gather-sum counts entries at or past `offsets[-1]` (or past the end of `src`) as
    zero and sums the rest; gather copies rows by index, into `out` when given. Checked against Python loops."""
    from hf_moe.moe.ops import gather_rows, gather_sum

    src = torch.randn(9, 5, dtype=torch.float64)
    index = torch.tensor([[0, 8], [3, 9], [6, 12], [7, 2]])  # 9 and 12 point past src
    for offsets, valid in ((torch.tensor([4, 7], dtype=torch.int32), 7), (None, 9)):
        got = gather_sum(src, index, offsets)
        want = torch.stack([sum((src[j] for j in row.tolist() if j < valid), torch.zeros(5, dtype=torch.float64))
                            for row in index])
        assert torch.equal(got, want)
    assert torch.equal(gather_sum(src[:0], index), torch.zeros(4, 5, dtype=torch.float64))
    token = torch.tensor([5, 0, 5, 2])
    out = torch.zeros(4, 7, dtype=torch.float64)
    gather_rows(src, token, torch.tensor([4], dtype=torch.int32), out=out[:, :5])
    assert all(torch.equal(out[i, :5], src[t]) for i, t in enumerate(token.tolist())) and not out[:, 5:].any()
