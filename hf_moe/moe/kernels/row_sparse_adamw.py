"""AdamW over the rows of a table that have a gradient (`hf_moe.RowSparseAdamW`'s update of product-key tables).

One program per row (a slice along dim 0): it reads the row's gradient and stops there unless an entry is nonzero
(NaN counts as nonzero, so it propagates as in AdamW); a touched row's parameter and two moments are updated in
float32 and stored in their dtype. Untouched rows cost one read of their gradient, so a step costs about
`1 + 6·f` table-sized passes for a touched fraction f, against dense AdamW's 7. No host sync: the grid is the row
count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .library import register_kernel_op

_MAX_BLOCK = 2048  # columns per tile; longer rows loop over tiles


@triton.jit
def _update(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, at, ok, g, decay, beta1, beta2, step_size, bias2_sqrt, eps):
    """AdamW on the entries `at` (float32 gradient `g`), stored in the tensors' dtypes."""
    p = tl.load(param_ptr + at, mask=ok, other=0.0).to(tl.float32) * decay
    m = tl.load(exp_avg_ptr + at, mask=ok, other=0.0).to(tl.float32)
    v = tl.load(exp_avg_sq_ptr + at, mask=ok, other=0.0).to(tl.float32)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bias2_sqrt + eps)
    tl.store(param_ptr + at, p.to(param_ptr.dtype.element_ty), mask=ok)
    tl.store(exp_avg_ptr + at, m.to(exp_avg_ptr.dtype.element_ty), mask=ok)
    tl.store(exp_avg_sq_ptr + at, v.to(exp_avg_sq_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_sparse_adamw_kernel(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, row_length, decay, beta1, beta2, step_size, bias2_sqrt, eps,
    BLOCK: tl.constexpr, ONE_TILE: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * row_length
    if ONE_TILE:  # the row's gradient is read once
        at = start + tl.arange(0, BLOCK)
        ok = tl.arange(0, BLOCK) < row_length
        g = tl.load(grad_ptr + at, mask=ok, other=0.0)
        if tl.sum((g != 0).to(tl.int32), axis=0) > 0:
            _update(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, at, ok, g.to(tl.float32), decay, beta1, beta2,
                    step_size, bias2_sqrt, eps)
    else:
        nonzero = 0
        for first in range(0, row_length, BLOCK):
            cols = first + tl.arange(0, BLOCK)
            g = tl.load(grad_ptr + start + cols, mask=cols < row_length, other=0.0)
            nonzero += tl.sum((g != 0).to(tl.int32), axis=0)
        if nonzero > 0:
            for first in range(0, row_length, BLOCK):
                cols = first + tl.arange(0, BLOCK)
                ok = cols < row_length
                g = tl.load(grad_ptr + start + cols, mask=ok, other=0.0).to(tl.float32)
                _update(param_ptr, exp_avg_ptr, exp_avg_sq_ptr, start + cols, ok, g, decay, beta1, beta2,
                        step_size, bias2_sqrt, eps)


def serves(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: contiguous, of one shape, floating point, at least one dimension."""
    tensors = (param, grad, exp_avg, exp_avg_sq)
    return (param.dim() >= 1 and all(t.shape == param.shape and t.is_contiguous() for t in tensors)
            and all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors))


def _row_sparse_adamw(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
) -> None:
    """One AdamW step (decoupled weight decay, bias correction at `step`) of the rows of `param` whose `grad` has a
    nonzero entry, in place; the other rows and their moments are left as they are."""
    rows = param.shape[0]
    row_length = param.numel() // rows if rows else 0
    if row_length == 0:
        return
    block = min(triton.next_power_of_2(row_length), _MAX_BLOCK)
    _row_sparse_adamw_kernel[(rows,)](
        param, grad, exp_avg, exp_avg_sq, row_length, 1.0 - lr * weight_decay, beta1, beta2,
        lr / (1.0 - beta1**step), (1.0 - beta2**step) ** 0.5, eps, BLOCK=block, ONE_TILE=block >= row_length,
        num_warps=8 if block >= 2048 else 4 if block >= 512 else 1,
    )


row_sparse_adamw = register_kernel_op(
    "row_sparse_adamw", _row_sparse_adamw, lambda param, grad, exp_avg, exp_avg_sq, *hyper: None,
    mutates_args=("param", "exp_avg", "exp_avg_sq"),
)
