"""Row operations shared by the experts and the dispatchers: gather rows by index, and gather-sum (each token's
rows summed in a fixed order, so results are deterministic: no atomics).

Rows are valid up to `offsets[-1]` (a device tensor, so no host sync): rows past it are dropped slots, which a
gather may leave unwritten and a gather-sum never reads. On CUDA with Triton installed both run as fused Triton
kernels (`hf_moe.moe.kernels.gather`); elsewhere as torch ops. `triton=None` decides from the tensor's device;
the experts pass their plan's choice.
"""

from __future__ import annotations

import torch

from . import kernels


def triton_serves(tensor: torch.Tensor) -> bool:
    """Whether hf-moe's Triton kernels serve `tensor`: a CUDA tensor, with Triton installed."""
    return kernels.HAS_TRITON and tensor.is_cuda


def gather_rows(
    src: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    triton: bool | None = None,
) -> torch.Tensor:
    """`out[s] = src[index[s]]` (into `out` when given) for the rows `s < offsets[-1]`; the Triton kernel leaves
    the rows past it unwritten. `src` and `out` may have any row stride; their columns must be contiguous."""
    if triton_serves(src) if triton is None else triton:
        return kernels.gather.gather_rows(src, index, offsets, out)
    if out is None:
        return src.index_select(0, index)
    return out.copy_(src.index_select(0, index))


def gather_sum(
    src: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor | None = None, triton: bool | None = None
) -> torch.Tensor:
    """`out[t] = Σ_j src[index[t, j]]` over the entries below `offsets[-1]` (every row of `src` when `offsets` is
    None); the other entries, which may point past the end of `src`, count as zero. `index` is `[T, k]`; the sum
    runs in a fixed order (the Triton kernel accumulates in float32)."""
    num_tokens = index.shape[0]
    if (triton_serves(src) if triton is None else triton) and num_tokens:
        if offsets is None:
            offsets = torch.full((1,), src.shape[0], dtype=torch.int32, device=src.device)
        if src.stride(1) != 1:
            src = src.contiguous()
        return kernels.gather.gather_sum(src, index.reshape(-1), offsets, num_tokens)
    num_rows = src.shape[0]  # not len(src): that is a Python int, which fixes the shape torch.export traces
    if num_rows == 0:
        return src.new_zeros(num_tokens, src.shape[-1])
    flat = index.reshape(-1)
    rows = src.index_select(0, flat.clamp(max=num_rows - 1))
    rows.masked_fill_((flat >= (num_rows if offsets is None else offsets[-1]))[:, None], 0)
    return rows.view(num_tokens, -1, src.shape[-1]).sum(dim=1)
