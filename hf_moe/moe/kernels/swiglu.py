"""SwiGLU with the routing weight, forward and backward, over the gate/up projection of rows sorted by expert.

Rows past `offsets[-1]` (read on the device, so no host sync) are dropped slots whose projection was never
written: the kernels neither read them nor let them reach an output. Block sizes were swept on an H100 at the
Qwen3-30B and Mixtral shapes (docs/decisions/experts-kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .library import register_kernel_op


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


def _swiglu_forward(gate_up: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`weight[:, None] · silu(gate) · up` for `gate_up [S, 2I]` (gate columns first) → `[S, I]`."""
    gate_up = gate_up.contiguous()
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(num_rows, inter)
    block_m, block_n = 32, 128
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(inter, block_n))
    _swiglu_fwd_kernel[grid](
        gate_up, weight, out, offsets, offsets.numel(), inter=inter, BLOCK_M=block_m, BLOCK_N=block_n
    )
    return out


swiglu_forward = register_kernel_op(
    "swiglu_forward", _swiglu_forward,
    lambda gate_up, weight, offsets: gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2),
)


def _swiglu_backward(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
    recompute_out: bool,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[`swiglu_backward`]'s launch; `out` is None unless `recompute_out`."""
    gate_up, grad_out = gate_up.contiguous(), grad_out.contiguous()
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    grad_gate_up = gate_up if in_place else torch.empty_like(gate_up)
    grad_weight = torch.empty(num_rows, device=gate_up.device, dtype=torch.float32)
    if not recompute_out:
        out = grad_gate_up  # not written (WRITE_OUT is off)
    else:
        out = grad_out if in_place else gate_up.new_empty(num_rows, inter)
    block_m, block_n = 4, 512  # few rows, wide column blocks, 8 warps
    grid = (triton.cdiv(num_rows, block_m),)
    _swiglu_bwd_kernel[grid](
        gate_up, weight, grad_out, grad_gate_up, out, grad_weight, offsets, offsets.numel(), num_rows, inter=inter,
        WRITE_OUT=recompute_out, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8,
    )
    return grad_gate_up, grad_weight, out if recompute_out else None


def _swiglu_backward_new(
    gate_up: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, offsets: torch.Tensor, recompute_out: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_gate_up, grad_weight, out = _swiglu_backward(gate_up, weight, grad_out, offsets, recompute_out)
    return grad_gate_up, grad_weight, gate_up.new_empty(0, gate_up.shape[1] // 2) if out is None else out


def _swiglu_backward_fake(gate_up, weight, grad_out, offsets, recompute_out):
    num_rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    return (torch.empty_like(gate_up), gate_up.new_empty(num_rows, dtype=torch.float32),
            gate_up.new_empty(num_rows if recompute_out else 0, inter))


_swiglu_backward_op = register_kernel_op("swiglu_backward", _swiglu_backward_new, _swiglu_backward_fake)


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
    is read before it is written, by the same program), so backward allocates neither `[S, 2I]` nor `[S, I]`;
    eager mode only (torch.compile traces the functional op `hf_moe::swiglu_backward`).
    """
    if in_place and torch.compiler.is_compiling():
        raise ValueError("swiglu_backward: in_place=True cannot be traced by torch.compile; pass in_place=False")
    if in_place:
        return _swiglu_backward(gate_up, weight, grad_out, offsets, recompute_out, in_place=True)
    grad_gate_up, grad_weight, out = _swiglu_backward_op(gate_up, weight, grad_out, offsets, recompute_out)
    return grad_gate_up, grad_weight, out if recompute_out else None
