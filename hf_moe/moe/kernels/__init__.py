"""Triton kernels of the routed experts, the router, the row-sparse optimizer, the language-model loss and the
attention's q/k norm (CUDA only), one module per fused operation:

- `gather`: row gather and deterministic gather-sum (the experts' and dispatchers' row movements);
- `swiglu`: SwiGLU with the routing weight, forward and backward;
- `grouped_gemm`: grouped GEMMs with TMA loads (Hopper or newer), the gate/up one with SwiGLU in its epilogue;
- `decode`: weight-streaming kernels for few rows per expert at inference;
- `sort_by_expert`: the (token, slot) pairs ordered by expert: one launch for few pairs (decode), a counting sort in
  two launches for many;
- `softmax_top_k`: the router's softmax → top-k → renormalisation and its backward;
- `product_key_top_k`: product-key routing's exact selection (each half's top-k by maxima or a bitonic top-k, then
  the pairs of ranks that can still be in the top k);
- `product_key_experts`: the singleton experts of product-key layers (token-centric forward and input backward), a
  torch custom op; `product_key_tables`: its table gradients (expert-sorted, deterministic);
- `cross_entropy`: the causal-LM loss's cross-entropy over the vocabulary and its backward, reading the logits in
  their own dtype (`hf_moe.loss`);
- `norm_rope`: per-head RMSNorm followed by RoPE (Qwen3's q/k norm) and its backward (`hf_moe.attention`);
- `row_sparse_adamw`: AdamW over the rows of a table that have a gradient (`hf_moe.RowSparseAdamW`);
- `quack_gemm`: the experts' weight gradients with quack-kernels' grouped GEMM (optional; imports quack, not Triton,
  and only when called).

Each launcher is also a torch custom op `hf_moe::<name>` (`library`), which torch.compile and torch.export
trace as one node. Each module is imported on first attribute access (`kernels.gather.gather_rows(...)`), which
callers make only for CUDA tensors when Triton is installed, so CPU-only machines never import Triton. The access
also works while torch.compile traces.
"""

import importlib
import importlib.util
from types import ModuleType

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Whether Triton is installed (found without importing it)."""

_KERNEL_MODULES = ("gather", "swiglu", "grouped_gemm", "decode", "sort_by_expert", "softmax_top_k",
                   "product_key_top_k", "product_key_experts", "row_sparse_adamw", "quack_gemm", "cross_entropy",
                   "norm_rope")

CROSS_ENTROPY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""The logits dtypes `cross_entropy` reads (others run the torch path)."""

PRODUCT_KEY_ACTIVATIONS = ("silu", "swish", "relu", "relu2")
"""The activations `product_key_experts` computes (others run the torch path)."""


def __getattr__(name: str) -> ModuleType:
    """The one lazy loader: `kernels.<module>` imports that kernel module (and Triton) on first use."""
    if name in _KERNEL_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; kernel modules: {_KERNEL_MODULES}")
