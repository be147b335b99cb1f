"""Non-gated experts (`gated_experts=False`: `y = down(act(up(x)))`) equal a float64 loop written here, through
every experts implementation, with gradients; and they work in a model (save/load, PEFT target_parameters)."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_moe import HfMoeConfig, HfMoeExperts, HfMoeForCausalLM, HfMoeNonGatedExperts
from hf_moe.moe.experts import liger_fused_experts_forward

from .conftest import tiny_config

ACTIVATIONS = {"relu2": lambda h: torch.relu(h) ** 2, "silu": lambda h: h * torch.sigmoid(h)}
IMPLEMENTATIONS = ["eager", "hf_moe_grouped", "hf_moe_capacity", "hf_moe_gathered", "batched_mm", "grouped_mm"]


def make(act: str, inter: int = 4, hidden: int = 12, experts: int = 6, top_k: int = 2) -> HfMoeNonGatedExperts:
    config = HfMoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                         num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=2, vocab_size=16,
                         hidden_act=act, gated_experts=False)
    experts = HfMoeNonGatedExperts(config).double()
    with torch.no_grad():
        experts.up_proj.normal_(0, 0.5)
        experts.down_proj.normal_(0, 0.5)
    return experts


def loop(up: torch.Tensor, down: torch.Tensor, x, index, weights, act: str) -> torch.Tensor:
    """`out[t] = Σ_j w[t, j] · down[e] · act(up[e] · x[t])`, one (token, slot) at a time, float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = int(index[t, j])
            if e >= up.shape[0]:
                continue
            h = up[e].double() @ x[t].double()
            out[t] += weights[t, j].double() * (down[e].double() @ ACTIVATIONS[act](h))
    return out


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("act", ["relu2", "silu"])
def test_every_implementation_equals_a_float64_loop_with_gradients(impl, act):
    torch.manual_seed(0)
    dtype = torch.float32 if impl == "grouped_mm" else torch.float64  # torch's grouped GEMM has no float64 kernel
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    experts = make(act).to(dtype)
    experts.config._experts_implementation = impl
    x = torch.randn(9, 12, dtype=dtype, requires_grad=True)
    index = torch.stack([torch.randperm(6)[:2] for _ in range(9)])
    index[2, 1] = 6  # a dropped (sentinel) slot
    index[5] = torch.tensor([3, 3]) if impl == "eager" else index[5]  # the loop sums a repeated expert twice
    weights = torch.rand(9, 2, dtype=dtype).masked_fill(index >= 6, 0.0).requires_grad_()
    if impl in ("batched_mm", "grouped_mm"):  # transformers' kernels do not skip sentinels: route them to 0, w 0
        index = index.clamp(max=5)
    out = experts(x, index, weights)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weights, experts.up_proj, experts.down_proj), grad)

    up = experts.up_proj.detach().clone().requires_grad_()
    down = experts.down_proj.detach().clone().requires_grad_()
    x_ref, w_ref = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    want_out = loop(up, down, x_ref, index, w_ref, act)
    want = torch.autograd.grad(want_out, (x_ref, w_ref, up, down), grad)
    torch.testing.assert_close(out.double(), want_out, **tol)
    for name, g, w in zip(("x", "weights", "up_proj", "down_proj"), got, want):
        torch.testing.assert_close(g.double(), w.double(), **tol, msg=lambda m, n=name: f"grad {n}: {m}")


def test_layout_and_refusals():
    experts = make("relu2", inter=7)
    assert experts.up_proj.shape == (6, 7, 12) and experts.down_proj.shape == (6, 12, 7)
    assert not experts.has_gate and not hasattr(experts, "gate_up_proj")
    experts.keep(2, 5)
    assert experts.up_proj.shape == (3, 7, 12) and experts.num_experts == 3
    with pytest.raises(ValueError, match="gated_experts"):
        HfMoeConfig(gated_experts="no")
    with pytest.raises(ValueError, match="non-gated"):
        liger_fused_experts_forward(experts, torch.zeros(2, 12), torch.zeros(2, 1, dtype=torch.long),
                                    torch.ones(2, 1))
    assert "hf_moe_grouped" in ALL_EXPERTS_FUNCTIONS


@pytest.mark.parametrize("act", ["relu2", "silu"])
def test_model_save_load_and_lora_target_parameters(tmp_path, act):
    from peft import get_peft_model

    from hf_moe.integrations import lora_config

    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(gated_experts=False, hidden_act=act, num_shared_experts=1)).eval()
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.mlp.experts.up_proj" in names and not any("gate_up_proj" in n for n in names)
    ids = torch.randint(1, 97, (2, 7))
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = HfMoeForCausalLM.from_pretrained(tmp_path).eval()
    assert not loaded.config.gated_experts
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)
        loaded.set_experts_implementation("eager")
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=1e-5, atol=1e-5)

    peft_model = get_peft_model(model, lora_config(r=2, attention=False, init_lora_weights=False))
    adapted = [n for n, _ in peft_model.named_parameters() if "lora" in n and "experts" in n]
    assert any("up_proj" in n for n in adapted) and any("down_proj" in n for n in adapted), adapted
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, logits)


def test_gathered_implementation_runs_gated_experts_as_the_reference_loop():
    """`hf_moe_gathered` (product-key models' default) also computes SwiGLU experts, sentinel slots included."""
    torch.manual_seed(0)
    config = HfMoeConfig(hidden_size=12, moe_intermediate_size=4, num_experts=6, num_experts_per_tok=2,
                         num_hidden_layers=1, num_attention_heads=2, vocab_size=16)
    experts = HfMoeExperts(config).double()
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.5)
        experts.down_proj.normal_(0, 0.5)
    x = torch.randn(9, 12, dtype=torch.float64)
    index = torch.stack([torch.randperm(6)[:2] for _ in range(9)])
    index[4, 0] = 6
    weights = torch.rand(9, 2, dtype=torch.float64).masked_fill(index >= 6, 0.0)
    config._experts_implementation = "eager"
    want = experts(x, index, weights)
    config._experts_implementation = "hf_moe_gathered"
    torch.testing.assert_close(experts(x, index, weights), want, rtol=1e-12, atol=1e-12)
