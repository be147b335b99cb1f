"""Fused memory-bound steps of the routed experts: SwiGLU with routing weights (forward and backward), and the
per-token combine of the k expert outputs.

Rows are (token, slot) pairs sorted by expert; `offsets[-1]` (read on the device, so no host sync) is the
number of rows that belong to a real expert. Rows past it are dropped slots whose GEMM outputs were never
written: the kernels neither read them nor let them reach an output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _swiglu_fwd_kernel(
    gate_up_ptr, weight_ptr, out_ptr, offsets_ptr, num_experts,
    inter: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_valid = tl.load(offsets_ptr + num_experts - 1)
    if pid_m * BLOCK_M >= num_valid:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_valid
    mask = row_ok[:, None] & (cols[None, :] < inter)
    gate_ptrs = gate_up_ptr + rows.to(tl.int64)[:, None] * (2 * inter) + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up * weight[:, None]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    gate_up_ptr, weight_ptr, grad_out_ptr, grad_gate_up_ptr, out_ptr, grad_weight_ptr, offsets_ptr,
    num_experts, num_rows,
    inter: tl.constexpr, WRITE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_valid = tl.load(offsets_ptr + num_experts - 1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_valid
    rows64 = rows.to(tl.int64)
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    if pid * BLOCK_M < num_valid:
        for start in range(0, inter, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols[None, :] < inter)
            gu_offs = rows64[:, None] * (2 * inter) + cols[None, :]
            io_offs = rows64[:, None] * inter + cols[None, :]
            gate = tl.load(gate_up_ptr + gu_offs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(gate_up_ptr + gu_offs + inter, mask=mask, other=0.0).to(tl.float32)
            grad = tl.load(grad_out_ptr + io_offs, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            act = silu * up
            grad_weight += tl.sum(grad * act, axis=1)
            grad_act = grad * weight[:, None]
            grad_gate = grad_act * up * sig * (1.0 + gate * (1.0 - sig))
            tl.store(grad_gate_up_ptr + gu_offs, grad_gate.to(grad_gate_up_ptr.dtype.element_ty), mask=mask)
            grad_up = (grad_act * silu).to(grad_gate_up_ptr.dtype.element_ty)
            tl.store(grad_gate_up_ptr + gu_offs + inter, grad_up, mask=mask)
            if WRITE_OUT:
                tl.store(out_ptr + io_offs, (act * weight[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_weight_ptr + rows, grad_weight, mask=rows < num_rows)


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


def gather_rows(
    src: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`out[s] = src[index[s]]` for the rows of real experts (`s < offsets[-1]`); dropped rows stay unwritten.
    `src` and `out` (allocated when not given) may have any row stride; their columns must be contiguous."""
    hidden = src.shape[1]
    if out is None:
        out = src.new_empty(index.numel(), hidden)
    if src.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(f"gather_rows: columns must be contiguous; got strides {src.stride()} and {out.stride()}")
    block_r, block_h = 4, min(1024, triton.next_power_of_2(hidden))
    grid = (triton.cdiv(index.numel(), block_r), triton.cdiv(hidden, block_h))
    _gather_rows_kernel[grid](
        src, index, out, offsets, offsets.numel(), hidden, src.stride(0), out.stride(0),
        BLOCK_R=block_r, BLOCK_H=block_h,
    )
    return out


def swiglu_forward(gate_up: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`weight[:, None] · silu(gate) · up` for `gate_up [S, 2I]` (gate columns first) → `[S, I]`."""
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(num_rows, inter)
    block_m, block_n = 32, 128  # swept on an H100 at the Qwen3-30B and Mixtral shapes (benchmarks/NOTES.md)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(inter, block_n))
    _swiglu_fwd_kernel[grid](
        gate_up, weight, out, offsets, offsets.numel(), inter=inter, BLOCK_M=block_m, BLOCK_N=block_n
    )
    return out


def swiglu_backward(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
    recompute_out: bool,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of [`swiglu_forward`] w.r.t. `gate_up` and `weight` (float32, 0 on dropped rows), and the
    recomputed forward output when `recompute_out` (the down projection's weight gradient needs it).

    `in_place` writes the `gate_up` gradient over `gate_up` and the recomputed output over `grad_out` (each element
    is read before it is written, by the same program), so backward allocates neither `[S, 2I]` nor `[S, I]`.
    """
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    grad_gate_up = gate_up if in_place else torch.empty_like(gate_up)
    grad_weight = torch.empty(num_rows, device=gate_up.device, dtype=torch.float32)
    if not recompute_out:
        out = grad_gate_up  # not written (WRITE_OUT is off)
    else:
        out = grad_out if in_place else gate_up.new_empty(num_rows, inter)
    block_m, block_n = 4, 512  # few rows, wide column blocks, 8 warps: swept as for swiglu_forward
    grid = (triton.cdiv(num_rows, block_m),)
    _swiglu_bwd_kernel[grid](
        gate_up, weight, grad_out, grad_gate_up, out, grad_weight, offsets, offsets.numel(), num_rows, inter=inter,
        WRITE_OUT=recompute_out, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8,
    )
    return grad_gate_up, grad_weight, out if recompute_out else None


def gather_sum(src: torch.Tensor, position: torch.Tensor, offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
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
