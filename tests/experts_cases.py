"""Shared by the experts-backend tests: random experts and routing (uniform, or skewed with idle experts and
dropped slots), the float64 reference loop, and the output and gradients of a fixed projection to compare."""

from __future__ import annotations

import torch

from hf_moe import HfMoeConfig
from hf_moe.moe.experts import HfMoeExperts


def make_experts(hidden=32, inter=48, experts=8, top_k=2, act="silu", dtype=torch.float64, device="cpu"):
    cfg = HfMoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, hidden_act=act,
    )
    module = HfMoeExperts(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, hidden**-0.5)
        module.down_proj.normal_(0, inter**-0.5)
    return module


def make_routing(num_tokens, experts, top_k, kind, device="cpu", dtype=torch.float64):
    """Top-k expert indices and weights. `skewed`: Zipf-like choice, the last quarter of the experts never chosen,
    and some slots dropped (index = `experts`, weight 0)."""
    if kind == "uniform":
        index = torch.rand(num_tokens, experts, device=device).argsort(dim=-1)[:, :top_k]
    else:
        live = max(top_k, experts - experts // 4)
        probs = 1.0 / torch.arange(1, live + 1, device=device, dtype=torch.float32) ** 1.5
        index = torch.multinomial(probs.expand(num_tokens, live), top_k, replacement=False)
    weights = torch.rand(num_tokens, top_k, device=device, dtype=dtype)
    if kind == "skewed":
        dropped = torch.rand(num_tokens, top_k, device=device) < 0.1
        index = index.masked_fill(dropped, experts)
        weights = weights.masked_fill(dropped, 0.0)
    return index, weights


def reference(experts, x, index, weights):
    """The reference loop ("eager"), run in float64 on CPU copies of everything."""
    ref = make_experts(
        experts.hidden_dim, experts.intermediate_dim, experts.num_experts, act=experts.config.hidden_act,
        dtype=torch.float64,
    )
    with torch.no_grad():
        ref.gate_up_proj.copy_(experts.gate_up_proj)
        ref.down_proj.copy_(experts.down_proj)
    x = x.detach().cpu().double().requires_grad_(True)
    weights = weights.detach().cpu().double().requires_grad_(True)
    return forward_and_grads(HfMoeExperts.forward.__wrapped__, ref, x, index.cpu(), weights)


def forward_and_grads(fn, experts, x, index, weights):
    """Output and gradients of a fixed random projection of the output w.r.t. x, weights and both projections."""
    x = x.detach().requires_grad_(True)
    weights = weights.detach().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out = fn(experts, x, index, weights)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * probe.to(out.device)).sum().backward()
    grads = (x.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    return [t.detach().double().cpu() for t in (out, *grads)]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


NAMES = ("out", "d_hidden", "d_weights", "d_gate_up", "d_down")


def mostly_elsewhere(num_tokens, experts, top_k, device="cpu", dtype=torch.float64):
    """Routing as one rank of expert parallelism sees it: ~70 % of the slots are sentinels (another rank's experts)
    and every token keeps at least one real slot. Returns the index, the weights and the number of real slots."""
    index, weights = make_routing(num_tokens, experts, top_k, "uniform", device=device, dtype=dtype)
    elsewhere = torch.rand(num_tokens, top_k, device=device) < 0.7
    elsewhere[:, 0] = False
    index, weights = index.masked_fill(elsewhere, experts), weights.masked_fill(elsewhere, 0.0)
    return index, weights, int((~elsewhere).sum())
