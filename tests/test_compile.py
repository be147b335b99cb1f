"""torch.compile on the CPU: the MoE block compiles as one graph (no graph break) and, like the whole model,
computes what eager computes, forward and backward."""

import copy

import pytest
import torch

from hf_moe import HfMoeForCausalLM
from hf_moe.moe.block import HfMoeSparseMoeBlock

from .conftest import assert_rel_close, tiny_config

BLOCK_CASES = {
    "dropless": {},
    "shared_expert": {"num_shared_experts": 1, "shared_expert_gate": True},
    "capacity": {"drop_tokens": True, "capacity_factor": 1.0},
}


def tiny_block(**overrides) -> HfMoeSparseMoeBlock:
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(**overrides))
    return next(m for m in model.modules() if isinstance(m, HfMoeSparseMoeBlock)).train()


def forward_backward(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The output, the input's gradient and every parameter's gradient of `sum(out · probe)`."""
    x = x.detach().requires_grad_(True)
    out = module(x)
    probe = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)  # a gradient that differs in every element
    (out * probe).sum().backward()
    return (out.detach(), x.grad, *(p.grad for p in module.parameters()))


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_compiles_fullgraph_with_no_graph_break(case):
    block = tiny_block(**BLOCK_CASES[case])
    x = torch.randn(2, 7, block.experts.hidden_dim)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_compiled_block_forward_and_backward_equal_eager(case):
    block = tiny_block(**BLOCK_CASES[case])
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True)
    x = torch.randn(2, 7, block.experts.hidden_dim)
    torch._dynamo.reset()
    got, want = forward_backward(compiled, x), forward_backward(block, x)
    assert len(got) == len(want) >= 5
    for name, g, w in zip(["out", "x.grad", *(n for n, _ in block.named_parameters())], got, want):
        assert g is not None and w is not None, name
        assert_rel_close(g, w, 1e-5, name)
