"""The routed experts' weight gradients with quack-kernels' grouped GEMM (CuTe DSL; Hopper or newer), an optional
dependency (`pip install hf-moe[quack]`).

quack's GEMM with variable-length K reduces each expert's rows into that expert's `[M, N]` block: on the H200 it
takes less GPU time than torch's grouped GEMM for the weight gradients, and no more elsewhere, so `hf_moe_grouped`
takes it for the weight gradients only, where its plan says so (`hf_moe.moe.experts.plan`). Measurements and the
rule: docs/decisions/quack.md.

quack is imported on the first call of `available()` or the op, never when this module is imported, so hf-moe works
without it. Its kernels are compiled on their first call (seconds) and cached under `QUACK_CACHE_DIR`. The call
takes the device offsets as they are (padded by a leading zero): nothing waits for the GPU.
"""

from __future__ import annotations

import os
import site
import sys
from types import ModuleType

import torch
import torch.nn.functional as F

from .library import register_kernel_op

_gemm_interface: ModuleType | None = None
_available: bool | None = None


def _quack() -> ModuleType:
    """quack's GEMM interface, imported on first use."""
    global _gemm_interface
    if _gemm_interface is None:
        # nvidia-cutlass-dsl puts its `cutlass` package on sys.path through a .pth file, which Python reads only in
        # site folders: an install with `pip install --target DIR` on PYTHONPATH needs DIR read as one.
        for entry in list(sys.path):
            if os.path.isfile(os.path.join(entry, "nvidia_cutlass_dsl_packages.pth")):
                site.addsitedir(entry)
        from quack import gemm_interface

        _gemm_interface = gemm_interface
    return _gemm_interface


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether quack's GEMMs can run here: a CUDA GPU of compute capability 9 or newer, and quack importable.
    Decided once per process; torch.compile reads it as a constant."""
    global _available
    if _available is None:
        _available = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
        if _available:
            try:
                _quack()
            except Exception:  # noqa: BLE001 - a broken install (missing CUDA libraries) fails in many ways
                _available = False
    return _available


def _weight_grad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`a [S, M]`, `b [S, N]` sorted by expert (bf16, CUDA) → `[E, M, N]` with `out[e] = a_eᵀ @ b_e`, zero for idle
    experts; the rows past `offsets[-1]` are not read."""
    cu_seqlens = F.pad(offsets, (1, 0))  # quack's form: [E + 1] int32 with a leading zero, on the device
    # variable-length K: the first operand must be M-major and the second N-major, i.e. both row-major [S, ·]
    return _quack().gemm(a.contiguous().t(), b.contiguous(), cu_seqlens_k=cu_seqlens, tuned=False)


def _weight_grad_fake(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return a.new_empty(offsets.shape[0], a.shape[1], b.shape[1])


weight_grad = register_kernel_op("quack_weight_grad", _weight_grad, _weight_grad_fake)
