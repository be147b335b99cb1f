"""Triton kernels for the routed experts' memory-bound steps (CUDA only).

Imported lazily by `hf_moe.moe.experts` when the hidden states live on a CUDA device and Triton is installed,
so CPU-only machines never import Triton.
"""
