"""The blocks `python -m benchmarks layer` times: hf-moe's MoE block and transformers' `Qwen3MoeSparseMoeBlock`
sharing one set of weights, the shapes, and the routings forced onto both routers."""

from __future__ import annotations

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from hf_moe import HfMoeConfig, HfMoeSparseMoeBlock

SHAPES = {  # name: (hidden, moe_intermediate, experts, top_k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "dsv3": (7168, 2048, 256, 8),
    "small": (512, 1024, 16, 2),
}
HF_IMPL = "hf_moe_grouped"
PEER_IMPLS = ("grouped_mm", "eager")
LIGER_IMPL = "liger_fused"


def build_blocks(shape: tuple[int, int, int, int], device: str, dtype: torch.dtype):
    """hf-moe's block and transformers' Qwen3-MoE block sharing one set of weights."""
    hidden, inter, experts, top_k = shape
    cfg = HfMoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, intermediate_size=inter, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, num_hidden_layers=1, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=128,
    )
    cfg._experts_implementation = HF_IMPL
    torch.manual_seed(0)
    with torch.device(device):
        hf_block = HfMoeSparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(0, 0.02)
    peer_cfg = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k,
        norm_topk_prob=True, num_hidden_layers=1,
    )
    with torch.device("meta"):
        peer = Qwen3MoeSparseMoeBlock(peer_cfg)
    peer.gate.weight = hf_block.router.weight
    peer.experts.gate_up_proj = hf_block.experts.gate_up_proj
    peer.experts.down_proj = hf_block.experts.down_proj
    return hf_block, peer


def forced_routing(kind: str, num_tokens: int, experts: int, top_k: int, device: str) -> torch.Tensor | None:
    if kind == "uniform":
        return None
    if kind == "balanced":
        slots = torch.arange(num_tokens * top_k, device=device)
        return (slots % experts).view(num_tokens, top_k)
    if kind == "skewed":
        probs = 1.0 / torch.arange(1, experts + 1, device=device, dtype=torch.float32) ** 1.2
        gen = torch.Generator(device=device).manual_seed(0)
        return torch.multinomial(probs.expand(num_tokens, experts), top_k, replacement=False, generator=gen)
    raise ValueError(f"routing must be uniform, balanced or skewed, got {kind!r}")


def set_routing(hf_block, peer, index: torch.Tensor | None) -> None:
    """Replace the experts each router picks by `index` (or restore the routers when `index` is None)."""
    for mod in (hf_block.router, peer.gate):
        mod.__dict__.pop("forward", None)
    if index is None:
        return
    hf_router, peer_router = hf_block.router, peer.gate
    hf_forward, peer_forward = type(hf_router).forward, type(peer_router).forward

    def hf_forced(hidden_states, token_mask=None, **kwargs):
        routing = hf_forward(hf_router, hidden_states, token_mask, **kwargs)
        routing.top_k_index = index  # in place: dataclasses.replace would read (so compute) the lazy z-loss
        return routing

    def peer_forced(hidden_states):
        logits, weights, _ = peer_forward(peer_router, hidden_states)
        return logits, weights, index

    hf_router.forward, peer_router.forward = hf_forced, peer_forced


def run_block(block, impl: str, x: torch.Tensor) -> torch.Tensor:
    block.experts.config._experts_implementation = impl
    return block(x)
