"""Liger-Kernel's fused MoE as an optional experts implementation, `liger_fused` (CUDA only).

Registered in transformers' experts interface when liger-kernel is installed (`pip install "hf-moe[liger]"`), so
`model.set_experts_implementation("liger_fused")` switches to it; liger_kernel (and with it Triton) is imported on
the first call, never by `import hf_moe`. It computes the same function as the other implementations on routing
without sentinel slots; `run_experts` compacts dropped / other ranks' slots before they reach it (it is not in
`SENTINEL_SAFE_IMPLEMENTATIONS`). Measured against `hf_moe_grouped` in docs/decisions/experts-kernels.md.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

LIGER_AVAILABLE = importlib.util.find_spec("liger_kernel") is not None
"""Whether liger-kernel is installed (checked without importing it)."""


def liger_fused_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`liger_kernel.ops.fused_moe.LigerFusedMoEFunction` on the experts' `[E, 2I, H]` / `[E, H, I]` weights: fused
    gather + grouped GEMM + SwiGLU, down projection, weighted gather-sum (one host sync per call for its tile
    count; its routing-weight gradient accumulates with atomics)."""
    if not self.has_gate:
        raise ValueError("experts implementation 'liger_fused' computes gated (SwiGLU) experts only; these are "
                         "non-gated (gated_experts=False): use 'hf_moe_grouped'.")
    if not hidden_states.is_cuda:
        raise RuntimeError("experts implementation 'liger_fused' runs on CUDA only; use 'hf_moe_grouped' here.")
    if self.config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"experts implementation 'liger_fused' computes SwiGLU only, not {self.config.hidden_act!r}.")
    from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

    x = hidden_states.to(self.gate_up_proj.dtype)
    out = LigerFusedMoEFunction.apply(
        x, self.gate_up_proj, self.down_proj, top_k_index.to(torch.int32), top_k_weights.to(x.dtype)
    )
    return out.to(hidden_states.dtype)


if LIGER_AVAILABLE:
    ALL_EXPERTS_FUNCTIONS.register("liger_fused", liger_fused_experts_forward)
