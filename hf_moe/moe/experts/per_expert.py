"""The grouped experts' GEMMs off CUDA: one `mm` per expert, rows sorted by expert, `offsets [E]` the end rows.

They read the offsets on the host, which is free on the CPU but a data-dependent value to torch.compile. Registered
as the custom ops `hf_moe::per_expert_mm` and `hf_moe::per_expert_weight_grad` (`register_kernel_op`), they are one
opaque node of known output shape while torch.compile or torch.export trace, so the block compiles with no graph
break (torch's grouped GEMM cannot stand in: its compile-time shape function accepts bf16 only); eager calls run the
functions themselves.
"""

from __future__ import annotations

import torch

from ..kernels.library import register_kernel_op


def _mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(a[start:end], b[expert], out=out[start:end])
        start = end
    if start < out.shape[0]:  # dropped rows
        out[start:].zero_()
    return out


def _weight_grad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = a.new_empty(offsets.numel(), a.shape[1], b.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(a[start:end].t(), b[start:end], out=out[expert])
        else:
            out[expert].zero_()
        start = end
    return out


per_expert_mm = register_kernel_op(
    "per_expert_mm", _mm, lambda a, b, offsets: a.new_empty(a.shape[0], b.shape[-1])
)
"""`a [S, K]` sorted by expert, `b [E, K, N]` → `[S, N]`: rows of expert e = `a_e @ b[e]`, rows past `offsets[-1]`
zero."""

per_expert_weight_grad = register_kernel_op(
    "per_expert_weight_grad", _weight_grad, lambda a, b, offsets: a.new_empty(offsets.numel(), a.shape[1], b.shape[1])
)
"""`a [S, M]`, `b [S, N]` sorted by expert → `[E, M, N]`: `out[e] = a_eᵀ @ b_e`, zero for idle experts."""
