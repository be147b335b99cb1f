"""Row gathers of the routed experts and dispatchers: copy rows by index, and sum each token's k rows in a fixed
order (deterministic, no atomics).

Rows are (token, slot) pairs sorted by expert; `offsets[-1]` (read on the device, so no host sync) is the
number of rows that belong to a real expert. Rows past it are dropped slots whose values were never written:
the kernels neither read them nor let them reach an output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .library import register_kernel_op


@triton.jit
def _gather_rows_kernel(
    src_ptr, index_ptr, out_ptr, offsets_ptr, num_experts, hidden, src_stride, out_stride,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    num_valid = tl.load(offsets_ptr + num_experts - 1)
    if pid_r * BLOCK_R >= num_valid:
        return
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < num_valid
    mask = row_ok[:, None] & (cols[None, :] < hidden)
    src_rows = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    vals = tl.load(src_ptr + src_rows[:, None] * src_stride + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :], vals, mask=mask)


@triton.jit
def _gather_sum_kernel(
    src_ptr, position_ptr, out_ptr, offsets_ptr, num_experts, num_tokens, hidden, src_stride,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    num_valid = tl.load(offsets_ptr + num_experts - 1)
    tokens = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < num_tokens
    col_ok = cols < hidden
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pos = tl.load(position_ptr + tokens * TOP_K + slot, mask=token_ok, other=0)
        ok = token_ok & (pos < num_valid)
        ptrs = src_ptr + pos.to(tl.int64)[:, None] * src_stride + cols[None, :]
        acc += tl.load(ptrs, mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    out_ptrs = out_ptr + tokens.to(tl.int64)[:, None] * hidden + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


def _gather_rows_into(src: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> None:
    hidden = src.shape[1]
    if src.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(f"gather_rows: columns must be contiguous; got strides {src.stride()} and {out.stride()}")
    # 4 rows × 512 columns per program: more programs in flight than with 1024 columns, which a copy bound by
    # memory latency needs (docs/decisions/compile.md, "RoPE's cosines and the loss's backward under compile")
    block_r, block_h = 4, min(512, triton.next_power_of_2(hidden))
    grid = (triton.cdiv(index.numel(), block_r), triton.cdiv(hidden, block_h))
    _gather_rows_kernel[grid](
        src, index, out, offsets, offsets.numel(), hidden, src.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_H=block_h,
    )


def _gather_rows_new(src: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = src.new_empty(index.numel(), src.shape[1])
    _gather_rows_into(src, index, offsets, out)
    return out


_gather_rows_op = register_kernel_op(
    "gather_rows", _gather_rows_new, lambda src, index, offsets: src.new_empty(index.numel(), src.shape[1])
)


def gather_rows(
    src: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`out[s] = src[index[s]]` for the rows of real experts (`s < offsets[-1]`); dropped rows stay unwritten
    (their values are unspecified when torch.compile traces the call with `out`: it copies a new tensor into it).
    `src` and `out` (allocated when not given) may have any row stride; their columns must be contiguous."""
    if out is None:
        return _gather_rows_op(src, index, offsets)
    if torch.compiler.is_compiling():
        return out.copy_(_gather_rows_op(src, index, offsets))
    _gather_rows_into(src, index, offsets, out)
    return out


def _gather_sum(src: torch.Tensor, position: torch.Tensor, offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`out[t] = Σ_j src[position[t·k + j]]` over the slots of real experts, accumulated in float32 in a fixed
    order (deterministic, no atomics). `src` may have any row stride; its columns must be contiguous."""
    hidden = src.shape[1]
    if src.stride(1) != 1:
        raise ValueError(f"gather_sum: the columns of src must be contiguous; got strides {src.stride()}")
    top_k = position.numel() // num_tokens
    out = src.new_empty(num_tokens, hidden)
    block_t, block_h = 4, min(1024, triton.next_power_of_2(hidden))
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))
    _gather_sum_kernel[grid](
        src, position, out, offsets, offsets.numel(), num_tokens, hidden, src.stride(0),
        TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h,
    )
    return out


gather_sum = register_kernel_op(
    "gather_sum", _gather_sum,
    lambda src, position, offsets, num_tokens: src.new_empty(num_tokens, src.shape[1]),
)
