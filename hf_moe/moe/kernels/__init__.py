"""Triton kernels of the routed experts and the router (CUDA only).

- `triton_moe`: the experts' memory-bound steps (row gather, SwiGLU forward/backward, deterministic combine);
- `grouped_gemm`: grouped GEMMs with TMA loads (Hopper or newer), the gate/up one with SwiGLU in its epilogue;
- `decode`: weight-streaming kernels for few rows per expert at inference;
- `softmax_top_k`: the router's softmax → top-k → renormalisation and its backward.

Imported lazily by `hf_moe.moe.experts` and `hf_moe.moe.router.topk` when a CUDA tensor arrives and Triton is installed,
so CPU-only machines never import Triton.
"""

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Whether Triton is installed (found without importing it)."""
