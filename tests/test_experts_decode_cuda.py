"""The decode kernels (CUDA, inference with few rows per expert) against the float64 reference loop and the
grouped-GEMM path: dropped slots, idle experts, strided weights, CUDA graphs, torch.compile and `generate`.

CUDA tests skip without a GPU and run on the device machine (`python -m pytest tests/test_experts_decode_cuda.py`).
"""

from __future__ import annotations

import pytest
import torch

from hf_moe import HfMoeForCausalLM
from hf_moe.moe.experts import grouped_experts_forward

from .conftest import count_calls, requires_cuda
from .experts_cases import make_experts, make_routing, mostly_elsewhere, reference, rel_err


def _decode_calls(monkeypatch) -> list[int]:
    """Counts calls of the decode kernels' entry point."""
    from hf_moe.moe.kernels import decode

    return count_calls(monkeypatch, decode, "decode_experts_forward")


def _grouped_path(experts, x, index, weights, **kwargs):
    """The general grouped-GEMM path on the same inputs (gradients on, so the decode kernels stay out)."""
    with torch.enable_grad():
        return grouped_experts_forward(experts, x.detach().requires_grad_(True), index, weights, **kwargs).detach()


@requires_cuda
@pytest.mark.parametrize("shape", [(256, 384, 16, 4), (96, 200, 5, 2), (512, 1024, 64, 8)])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "one_expert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_decode_kernels_match_reference(monkeypatch, shape, kind, dtype):
    """Inference with few rows per expert runs the decode kernels; their output matches the float64 loop as well
    as the grouped-GEMM path does, with experts that get no token, dropped slots, and (`one_expert`) every token
    on expert 0 so that it loops over several row blocks."""
    hidden, inter, num_experts, top_k = shape
    tokens = 2 * num_experts // top_k + 3  # ≤ 16 rows per expert on average
    experts = make_experts(hidden, inter, num_experts, top_k, dtype=dtype, device="cuda")
    index, weights = make_routing(tokens, num_experts, top_k, "uniform" if kind == "one_expert" else kind,
                                  device="cuda", dtype=dtype)
    if kind == "one_expert":
        index[:, 0] = 0
        index[:, 1:] = torch.where(index[:, 1:] == 0, 1, index[:, 1:])
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    calls = _decode_calls(monkeypatch)
    with torch.no_grad():
        got = grouped_experts_forward(experts, x, index, weights)
    assert calls, "the decode kernels did not run"
    want = reference(experts, x, index, weights)[0]
    general = _grouped_path(experts, x, index, weights)
    assert torch.isfinite(got).all()
    assert rel_err(got.double().cpu(), want) < max(1e-2, 1.5 * rel_err(general.double().cpu(), want))


@requires_cuda
def test_cuda_decode_kernels_with_known_slot_count_and_strided_weights(monkeypatch):
    """The expert-parallel call (`num_slots`, most slots elsewhere) and weights that are views with other strides
    (a slice of a larger tensor; a transposed copy) give the general path's result."""
    experts = make_experts(256, 384, 16, 8, dtype=torch.bfloat16, device="cuda")
    index, weights, num_slots = mostly_elsewhere(20, 16, 8, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(20, 256, device="cuda", dtype=torch.bfloat16)
    want = reference(experts, x, index, weights)[0]
    calls = _decode_calls(monkeypatch)
    with torch.no_grad():
        got = grouped_experts_forward(experts, x, index, weights, num_slots=num_slots)
        wide = torch.randn(16, 2 * 384 + 8, 256 + 24, device="cuda", dtype=torch.bfloat16)
        wide[:, 4 : 4 + 2 * 384, :256] = experts.gate_up_proj
        down_t = experts.down_proj.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major
        experts.gate_up_proj = torch.nn.Parameter(wide[:, 4 : 4 + 2 * 384, :256])
        experts.down_proj = torch.nn.Parameter(down_t)
        strided = grouped_experts_forward(experts, x, index, weights)
    assert len(calls) == 2
    for out in (got, strided):
        assert rel_err(out.double().cpu(), want) < 1e-2


@requires_cuda
def test_cuda_decode_path_only_without_gradients_and_for_few_rows(monkeypatch):
    """Training (anything that needs a gradient), fp32 weights and batches with many rows per expert keep the
    grouped GEMMs."""
    from hf_moe.moe.experts.plan import DECODE_ROWS_PER_EXPERT

    experts = make_experts(128, 256, 8, 2, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(40, 8, 2, "uniform", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(40, 128, device="cuda", dtype=torch.bfloat16)
    calls = _decode_calls(monkeypatch)
    grouped_experts_forward(experts, x, index, weights)  # the weights require grad
    many = DECODE_ROWS_PER_EXPERT * 8 // 2 + 1  # tokens: just over the decode path's rows per expert
    with torch.no_grad():
        big_index, big_weights = make_routing(many, 8, 2, "uniform", device="cuda", dtype=torch.bfloat16)
        grouped_experts_forward(experts, torch.randn(many, 128, device="cuda", dtype=torch.bfloat16), big_index,
                                big_weights)
        grouped_experts_forward(experts.float(), x.float(), index, weights.float())
    assert not calls
    with torch.no_grad():
        grouped_experts_forward(experts.bfloat16(), x, index, weights)
    assert len(calls) == 1


@requires_cuda
def test_cuda_decode_kernels_capture_in_a_graph_without_host_sync():
    """One decode step replays from a CUDA graph: no host sync, and the replay on new routing equals eager."""
    experts = make_experts(256, 384, 32, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(24, 32, 4, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(24, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        grouped_experts_forward(experts, x, index, weights)  # compile the kernels first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = grouped_experts_forward(experts, x, index, weights)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        new_index, new_weights = make_routing(24, 32, 4, "uniform", device="cuda", dtype=torch.bfloat16)
        index.copy_(new_index)
        weights.copy_(new_weights)
        x.normal_()
        graph.replay()
        want = grouped_experts_forward(experts, x, index, weights)
    assert torch.equal(out, want)


@requires_cuda
def test_cuda_decode_kernels_compile_fullgraph():
    experts = make_experts(256, 384, 16, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(30, 16, 4, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(30, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(grouped_experts_forward, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(experts, x, index, weights).float(), grouped_experts_forward(experts, x, index,
                                                                                            weights).float()) < 1e-3


@requires_cuda
def test_cuda_generate_runs_the_decode_kernels_and_matches_the_grouped_gemms(monkeypatch):
    """A bf16 model's `generate` (prefill, then one token at a time with the KV cache) takes the decode kernels,
    and its logits agree with the grouped-GEMM path's to bf16 rounding."""
    from hf_moe.moe.experts.plan import override_plan

    from .conftest import tiny_config

    config = tiny_config(hidden_size=128, moe_intermediate_size=96, num_experts=16, num_experts_per_tok=4)
    model = HfMoeForCausalLM(config).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (2, 9), device="cuda")
    calls = _decode_calls(monkeypatch)
    with torch.no_grad():
        sequences = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="dynamic")
    assert len(calls) >= 6 * config.num_hidden_layers  # the prefill and five single-token steps
    with torch.no_grad():
        fast = model(sequences).logits.float()
        with override_plan(decode_rows_per_expert=0):
            grouped = model(sequences).logits.float()
    assert rel_err(fast, grouped) < 2e-2, rel_err(fast, grouped)
