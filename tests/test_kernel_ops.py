"""hf-moe's Triton kernels as torch custom ops (`hf_moe::*`): `torch.library.opcheck` (schema, fake implementation,
autograd registration, AOT tracing) and the MoE block traced by torch.compile through them.

Runs where the kernels can run: on a CUDA device, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1` with Triton installed); skipped elsewhere (the CPU CI has no Triton). The interpreter cannot run
the persistent grouped GEMMs or the decode kernels (their device-side loop bounds), so on CPU those are checked on
their torch fallback and with fake tensors only.
"""

import copy
import importlib.util
import os

import pytest
import torch

from .conftest import assert_rel_close, rel_err

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton and a CUDA device, or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if CUDA else "cpu"


def _offsets(counts: list[int]) -> torch.Tensor:
    """Expert end rows; the last one is the number of rows, so no row is left unwritten (opcheck compares every
    element of the outputs)."""
    return torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)


def _opcheck(name: str, *args) -> None:
    torch.library.opcheck(getattr(torch.ops.hf_moe, name).default, args)


def test_row_and_swiglu_ops_pass_opcheck():
    from hf_moe.moe.kernels import gather, swiglu  # noqa: F401  (registers the ops)

    torch.manual_seed(0)
    tokens, top_k, hidden, inter = 6, 2, 40, 24
    offsets = _offsets([3, 0, 6, 3])
    rows = tokens * top_k
    _opcheck("gather_rows", torch.randn(tokens, hidden, device=DEVICE), torch.randint(0, tokens, (rows,),
                                                                                      device=DEVICE), offsets)
    _opcheck("gather_sum", torch.randn(rows, hidden, device=DEVICE), torch.randperm(rows, device=DEVICE), offsets,
             tokens)
    gate_up, weight = torch.randn(rows, 2 * inter, device=DEVICE), torch.rand(rows, device=DEVICE)
    _opcheck("swiglu_forward", gate_up, weight, offsets)
    for recompute in (True, False):
        _opcheck("swiglu_backward", gate_up, weight, torch.randn(rows, inter, device=DEVICE), offsets, recompute)


def test_router_ops_pass_opcheck_and_match_torch():
    from hf_moe.moe.kernels import softmax_top_k  # noqa: F401

    torch.manual_seed(0)
    logits = torch.randn(5, 40, device=DEVICE)
    _opcheck("softmax_top_k", logits, 3, True)
    probs, index, weights = torch.ops.hf_moe.softmax_top_k(logits, 3, True)
    want = torch.softmax(logits.double(), -1).topk(3)
    assert torch.equal(index, want.indices)
    assert_rel_close(weights, want.values / want.values.sum(-1, keepdim=True), 1e-6, "weights")
    for grad_probs, normalize in ((torch.randn_like(probs), True), (None, False)):
        _opcheck("softmax_top_k_backward", probs, index, weights, torch.randn_like(weights), grad_probs, normalize)


def test_grouped_gemm_ops_pass_opcheck():
    """On CUDA with TMA these run hf-moe's kernels; elsewhere (and for operands the kernels do not support) the op
    itself falls back to torch's grouped GEMM, which the CPU checks here."""
    from hf_moe.moe.kernels import grouped_gemm  # noqa: F401

    torch.manual_seed(0)
    dtype = torch.bfloat16 if CUDA else torch.float32
    offsets = _offsets([130, 0, 7, 19])
    rows, hidden, inter, experts = 156, 64, 96, 4
    x = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)
    gate_up_proj = torch.randn(experts, 2 * inter, hidden, device=DEVICE, dtype=dtype) / hidden**0.5
    _opcheck("grouped_mm", x, gate_up_proj.transpose(1, 2), offsets)
    _opcheck("gate_up_swiglu", x, gate_up_proj, torch.rand(rows, device=DEVICE), offsets)


def test_dispatcher_calls_the_launcher_itself():
    """Compiled code calls the ops through the dispatcher: the first Python function it enters is the launcher, with
    no wrapper in between (`torch.library.custom_op`'s cost ~75 µs of host time per call on an H100's host)."""
    import sys

    from hf_moe.moe.kernels import gather, grouped_gemm  # noqa: F401

    rows, hidden = 12, 16
    offsets = _offsets([5, 0, 7])
    calls = {
        "_gather_sum": lambda: torch.ops.hf_moe.gather_sum.default(
            torch.randn(rows, hidden, device=DEVICE), torch.randperm(rows, device=DEVICE), offsets, rows // 2),
        "_grouped_mm": lambda: torch.ops.hf_moe.grouped_mm.default(
            torch.randn(rows, hidden, device=DEVICE), torch.randn(3, hidden, 8, device=DEVICE), offsets),
    }
    for launcher, call in calls.items():
        entered: list[str] = []
        sys.setprofile(lambda frame, event, arg: event == "call" and entered.append(frame.f_code.co_name))  # noqa: B023
        try:
            call()
        finally:
            sys.setprofile(None)
        assert entered[1:3] == ["__call__", launcher], entered[:5]  # the lambda, then `OpOverload.__call__`


def test_decode_op_has_the_shape_of_its_output_under_fake_tensors():
    from torch._subclasses import FakeTensorMode

    from hf_moe.moe.kernels import decode  # noqa: F401

    with FakeTensorMode():
        x = torch.empty(5, 32, dtype=torch.bfloat16)
        out = torch.ops.hf_moe.decode_experts_forward(
            x, torch.empty(4, 48, 32, dtype=torch.bfloat16), torch.empty(4, 32, 24, dtype=torch.bfloat16),
            torch.empty(5, 2, dtype=torch.bfloat16), torch.empty(10, dtype=torch.int64),
            torch.empty(10, dtype=torch.int64), torch.empty(4, dtype=torch.int32),
        )
    assert out.shape == (5, 32) and out.dtype == torch.bfloat16


@pytest.mark.skipif(not CUDA, reason="the decode kernels do not run under Triton's interpreter")
def test_decode_op_passes_opcheck():
    from hf_moe.moe.experts.grouped import sort_by_expert
    from hf_moe.moe.kernels import decode  # noqa: F401

    torch.manual_seed(0)
    tokens, hidden, inter, experts, top_k = 5, 64, 32, 8, 2
    index = torch.randint(0, experts, (tokens, top_k), device=DEVICE)
    _, order, position, offsets = sort_by_expert(index, experts)
    bf16 = dict(device=DEVICE, dtype=torch.bfloat16)
    _opcheck("decode_experts_forward", torch.randn(tokens, hidden, **bf16),
             torch.randn(experts, 2 * inter, hidden, **bf16) / 8, torch.randn(experts, hidden, inter, **bf16) / 6,
             torch.rand(tokens, top_k, **bf16), order, position, offsets)


def _graph_code(explanation) -> str:
    return "\n".join(graph.print_readable(print_output=False) for graph in explanation.graphs)


def test_block_on_triton_kernels_compiles_fullgraph_through_the_ops_and_equals_eager(monkeypatch):
    """The router's fused top-k, the row gathers and SwiGLU run as the Triton kernels (forced here: on CPU under the
    interpreter, and for this router's few experts); dynamo traces them as the ops, with no graph break, and forward
    and backward equal eager."""
    from hf_moe.moe.experts.plan import override_plan
    from hf_moe.moe.router.topk import HfMoeRouter

    from .test_compile import forward_backward, tiny_block

    monkeypatch.setattr(HfMoeRouter, "fuses_softmax_top_k", lambda self, logits: True)

    block = tiny_block().to(DEVICE)
    x = torch.randn(2, 7, block.experts.hidden_dim, device=DEVICE)
    with override_plan(triton=True):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(block)(x)
        assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
        code = _graph_code(explanation)
        for op in ("softmax_top_k", "softmax_top_k_backward", "gather_rows", "gather_sum", "swiglu_forward",
                   "swiglu_backward"):
            assert f"hf_moe.{op}" in code, op
        compiled = torch.compile(copy.deepcopy(block), fullgraph=True)
        got, want = forward_backward(compiled, x), forward_backward(block, x)
    errors = {name: rel_err(g, w) for name, g, w in zip(["out", "x.grad", *dict(block.named_parameters())], got, want)}
    tolerance = 1e-4 if CUDA else 1e-5  # on CUDA inductor's own reductions differ in order from eager's
    assert max(errors.values()) <= tolerance, errors
