"""The token-centric experts implementation for many small experts, `hf_moe_gathered` (the default of product-key
models): each token gathers its k experts' rows and computes them itself, so nothing loops over the experts and no
work or memory scales with their number.

`out[t] = Σⱼ w[t, j] · down[e]·act(up[e]·x[t])` with `e = index[t, j]`. On CPU (and wherever the Triton kernels do
not serve) it is torch ops: two embedding gathers `[T, k, I·H]`, whose backward adds into the touched rows of the
two tables only. On CUDA it is `hf_moe.moe.kernels.product_key_experts` (a custom op with its autograd): a
token-centric forward that never materialises the gathered rows, and a backward that sorts the (token, slot) pairs
by expert and accumulates each touched row in a fixed order (deterministic, no atomics). Sentinel slots (index ≥
`num_experts`) contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .. import kernels
from ..ops import triton_serves
from .module import input_projection


def _activation(projected: torch.Tensor, act_fn: nn.Module, gated: bool) -> torch.Tensor:
    if not gated:
        return act_fn(projected)
    gate, up = projected.chunk(2, dim=-1)
    return act_fn(gate) * up


def gathered_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """hf-moe's token-centric experts implementation (`hf_moe_gathered`), see the module docstring."""
    up_proj, gated = input_projection(self)
    down_proj, num_experts = self.down_proj, self.num_experts
    x = hidden_states.to(down_proj.dtype)
    act = self.config.hidden_act
    if not gated and down_proj.shape[-1] == 1 and act in kernels.PRODUCT_KEY_ACTIVATIONS and triton_serves(x):
        out = kernels.product_key_experts.product_key_experts(  # skips sentinel slots itself
            x, up_proj.reshape(num_experts, -1), down_proj.reshape(num_experts, -1), top_k_index, top_k_weights, act
        )
        return out.to(hidden_states.dtype)
    num_tokens, top_k = top_k_index.shape
    valid = top_k_index < num_experts
    index = top_k_index.clamp(max=num_experts - 1)
    weights = top_k_weights.masked_fill(~valid, 0.0)
    hidden, rows = x.shape[-1], up_proj.shape[1]
    up = F.embedding(index, up_proj.reshape(num_experts, -1)).view(num_tokens, top_k, rows, hidden)
    projected = torch.einsum("tkrh,th->tkr", up, x)
    act = _activation(projected, self.act_fn, gated) * weights[..., None].to(x.dtype)
    down = F.embedding(index, down_proj.reshape(num_experts, -1)).view(num_tokens, top_k, hidden, -1)
    return torch.einsum("tkhi,tki->th", down, act).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register("hf_moe_gathered", gathered_experts_forward)
