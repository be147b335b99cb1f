"""torch.compile on CUDA (run on the device machine; skipped without CUDA): the MoE block with hf-moe's Triton
kernels compiles as one graph through the custom ops `hf_moe::*`, with no host sync, and computes what eager computes
(bf16 tolerance), for training, decode, `mode="reduce-overhead"` and static-cache generation."""

import copy

import pytest
import torch

from hf_moe import HfMoeForCausalLM
from hf_moe.moe.block import HfMoeSparseMoeBlock
from hf_moe.moe.experts.plan import override_plan

from .conftest import rel_err, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BF16_TOL = 3e-2
TRAIN_OPS = ("softmax_top_k", "gather_rows", "gate_up_swiglu", "grouped_mm", "gather_sum", "swiglu_backward",
             "softmax_top_k_backward")


def cuda_config(**overrides):
    """32 experts: the router's fused top-k serves from 32 experts on."""
    kwargs = dict(vocab_size=256, hidden_size=128, moe_intermediate_size=64, intermediate_size=128, num_experts=32,
                  num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    kwargs.update(overrides)
    return tiny_config(**kwargs)


def cuda_block() -> HfMoeSparseMoeBlock:
    torch.manual_seed(0)
    model = HfMoeForCausalLM(cuda_config()).to("cuda", torch.bfloat16)
    return next(m for m in model.modules() if isinstance(m, HfMoeSparseMoeBlock))


def forward_backward(module, x):
    x = x.detach().requires_grad_(True)
    out = module(x)
    probe = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).view_as(out).to(out.dtype)
    (out.float() * probe.float()).sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return [out.detach(), x.grad, *grads]


def graph_code(explanation) -> str:
    return "\n".join(graph.print_readable(print_output=False) for graph in explanation.graphs)


def test_cuda_block_training_compiles_fullgraph_through_the_kernel_ops_and_equals_eager():
    block = cuda_block().train()
    x = torch.randn(4, 64, block.experts.hidden_dim, device="cuda", dtype=torch.bfloat16)
    with override_plan(own_gemm_min_multiply_adds=0):  # the Triton GEMMs, as at the real shapes
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(block)(x)
        assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
        code = graph_code(explanation)
        missing = [op for op in TRAIN_OPS if f"hf_moe.{op}" not in code]
        assert not missing, missing
        compiled = torch.compile(copy.deepcopy(block), fullgraph=True)
        got, want = forward_backward(compiled, x), forward_backward(block, x)
    names = ["out", "x.grad", *(n for n, _ in block.named_parameters())]
    for name, g, w in zip(names, got, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < BF16_TOL, (name, rel_err(g, w))


def test_cuda_compiled_block_step_waits_for_nothing_on_the_host():
    block = cuda_block().train()
    x = torch.randn(4, 64, block.experts.hidden_dim, device="cuda", dtype=torch.bfloat16)
    with override_plan(own_gemm_min_multiply_adds=0):
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)
        forward_backward(compiled, x)  # compiles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = compiled(x.detach().requires_grad_(True))
            out.float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compiled_decode_block_equals_eager(mode):
    block = cuda_block().eval()
    x = torch.randn(8, 1, block.experts.hidden_dim, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(block)(x)
        assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
        assert "hf_moe.decode_experts_forward" in graph_code(explanation)
        compiled = torch.compile(block, fullgraph=True, mode=mode)
        want = block(x)
        for _ in range(3):  # reduce-overhead records its CUDA graph on a later call
            got = compiled(x)
    assert rel_err(got, want) < BF16_TOL


def test_cuda_compiled_model_training_step_equals_eager():
    """bf16 rounding differs between the compiled and the eager step (inductor fuses and reorders), so each is
    compared with a float32 eager reference of the same weights: the compiled step's error must be no larger than
    the eager bf16 step's (within a factor of 2 and a floor)."""
    torch.manual_seed(0)
    model = HfMoeForCausalLM(cuda_config(router_aux_loss_coef=0.01)).to("cuda").train()
    reference = copy.deepcopy(model)  # float32
    model = model.to(torch.bfloat16)
    compiled_model = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    torch._dynamo.reset()
    runs = {"compiled": (torch.compile(compiled_model), compiled_model), "eager": (model, model),
            "reference": (reference, reference)}
    results = {}
    for name, (run, module) in runs.items():
        out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        results[name] = {"logits": out.logits, "loss": out.loss,
                         **{n: p.grad for n, p in module.named_parameters()}}
    want = results["reference"]
    for key in want:
        compiled_err = rel_err(results["compiled"][key], want[key])
        eager_err = rel_err(results["eager"][key], want[key])
        assert compiled_err <= max(2 * eager_err, 1e-2), (key, compiled_err, eager_err)


def test_cuda_compiled_static_cache_generate_equals_dynamic_cache():
    torch.manual_seed(0)
    model = HfMoeForCausalLM(cuda_config()).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 256, (4, 12), device="cuda")
    dynamic = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="dynamic")
    torch._dynamo.reset()
    static = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, cache_implementation="static")
    assert any("compiled" in key for key in model.__dict__), "generate did not compile the forward"
    agree = (static == dynamic).float().mean().item()
    assert agree == 1.0, f"static-cache compiled generate agrees with dynamic on {agree:.1%} of the tokens"
