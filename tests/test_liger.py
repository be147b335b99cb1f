"""The optional `liger_fused` experts implementation (Liger-Kernel's fused MoE).

CPU (CI): `import hf_moe` imports neither liger_kernel nor Triton, and the name is registered exactly when
liger-kernel is installed. CUDA (device machine, liger-kernel installed): bf16 against the float64 reference loop,
with skewed routing and experts that receive no token, no worse than transformers' own grouped_mm.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_moe import LIGER_AVAILABLE, HfMoeConfig, HfMoeForCausalLM, liger_fused_experts_forward

from .experts_cases import NAMES, forward_and_grads, make_experts, reference, rel_err

requires_liger_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and LIGER_AVAILABLE), reason="needs a CUDA device and liger-kernel"
)


def test_import_hf_moe_loads_no_gpu_only_package():
    """`import hf_moe` adds neither liger_kernel nor Triton to what its dependencies load (on a GPU machine torch or
    transformers may import Triton themselves)."""
    code = (
        "import sys, torch, transformers, transformers.integrations.moe, accelerate, peft; before = set(sys.modules); "
        "import hf_moe; print(sorted(m for m in ('liger_kernel', 'triton') if m in sys.modules and m not in before))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_registered_exactly_when_installed():
    assert LIGER_AVAILABLE == (importlib.util.find_spec("liger_kernel") is not None)
    assert ("liger_fused" in ALL_EXPERTS_FUNCTIONS) == LIGER_AVAILABLE


def test_refuses_cpu_tensors_with_a_clear_error():
    experts = make_experts(dtype=torch.float32)
    index = torch.randint(0, experts.num_experts, (5, 2))
    with pytest.raises(RuntimeError, match="CUDA only"):
        liger_fused_experts_forward(experts, torch.randn(5, experts.hidden_dim), index, torch.rand(5, 2))


def skewed_routing(num_tokens: int, experts: int, top_k: int, device: str, dtype: torch.dtype):
    """Zipf-like choice over the first three quarters of the experts: the rest receive no token."""
    live = experts - experts // 4
    probs = 1.0 / torch.arange(1, live + 1, device=device, dtype=torch.float32) ** 1.5
    index = torch.multinomial(probs.expand(num_tokens, live), top_k, replacement=False)
    return index, torch.rand(num_tokens, top_k, device=device, dtype=dtype)


@requires_liger_cuda
@pytest.mark.parametrize("shape", [(256, 384, 16, 4), (512, 1024, 8, 2), (128, 200, 5, 2)])
def test_cuda_bf16_matches_float64_reference(shape):
    hidden, inter, num_experts, top_k = shape
    experts = make_experts(hidden, inter, num_experts, top_k, dtype=torch.bfloat16, device="cuda")
    index, weights = skewed_routing(333, num_experts, top_k, "cuda", torch.bfloat16)
    x = torch.randn(333, hidden, device="cuda", dtype=torch.bfloat16)
    want = reference(experts, x, index, weights)
    got = forward_and_grads(liger_fused_experts_forward, experts, x, index, weights)
    peer = forward_and_grads(ALL_EXPERTS_FUNCTIONS["grouped_mm"], experts, x, index, weights)
    for name, g, p, w in zip(NAMES, got, peer, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < max(1e-2, 1.5 * rel_err(p, w)), (name, rel_err(g, w), rel_err(p, w))
    idle = torch.ones(num_experts, dtype=torch.bool)
    idle[index.unique().cpu()] = False
    assert idle.any()
    assert got[3][idle].abs().max() == 0 and got[4][idle].abs().max() == 0


@requires_liger_cuda
def test_cuda_model_switches_to_liger_fused():
    cfg = HfMoeConfig(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
    )
    model = HfMoeForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (2, 37), device="cuda")
    with torch.no_grad():
        ours = model(ids).logits.float()
        model.set_experts_implementation("liger_fused")
        assert model.config._experts_implementation == "liger_fused"
        liger = model(ids).logits.float()
    assert rel_err(liger, ours) < 2e-2
