"""Per-head RMSNorm followed by RoPE (Qwen3's q/k norm), forward and backward, one pass over the heads each way.

Forward reads a head's row once (rounding once, to the input's dtype, after RoPE); backward reads the row and its
gradient once and writes the input's gradient, and sums the weight's gradient per block of rows (a float32
`[blocks, D]` that torch reduces). Under torch.compile both are custom ops: inductor's kernels for the same
operators re-read and write the normalised rows between the norm's backward and RoPE's, and their weight-gradient
reduction (docs/decisions/compile.md, "q/k norm and RoPE in one kernel").

Rows are the `[B, S, H]` heads of `x [B, S, H, D]` (any strides, the last one 1); `cos, sin [B or 1, S, D]` are
Llama's (`rotate_half` pairs the two halves of a head), broadcast over the heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .library import register_kernel_op

_BLOCK_R = 32  # heads per program


@triton.jit
def _row_offsets(rows, heads, seq, s_b, s_s, s_h):
    """Element offset of each head row `(b, s, h)` of a `[B, S, H, ·]` tensor with strides `(s_b, s_s, s_h, 1)`."""
    h = rows % heads
    s = (rows // heads) % seq
    b = rows // (heads * seq)
    return b * s_b + s * s_s + h * s_h, b, s


@triton.jit
def _norm_rope_fwd_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, num_rows, heads, seq, eps,
    xs_b, xs_s, xs_h, cs_b, cs_s, D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = (rows < num_rows)[:, None]
    cols = tl.arange(0, D)
    partner = (cols + D // 2) % D  # rotate_half: column d takes -x[d + D/2] (first half) or x[d - D/2]
    sign = tl.where(cols < D // 2, -1.0, 1.0)
    x_off, b, s = _row_offsets(rows, heads, seq, xs_b, xs_s, xs_h)
    c_off = (b * cs_b + s * cs_s)[:, None]
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x_p = tl.load(x_ptr + x_off[:, None] + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    w = tl.load(w_ptr + cols).to(tl.float32)[None, :]
    w_p = tl.load(w_ptr + partner).to(tl.float32)[None, :]
    cos = tl.load(cos_ptr + c_off + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + c_off + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    out = x * r * w * cos + sign[None, :] * (x_p * r * w_p) * sin
    out_off = rows[:, None] * D + cols[None, :]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _norm_rope_bwd_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, g_ptr, dx_ptr, dw_ptr, num_rows, heads, seq, eps,
    xs_b, xs_s, xs_h, cs_b, cs_s, gs_b, gs_s, gs_h, D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = (rows < num_rows)[:, None]
    cols = tl.arange(0, D)
    partner = (cols + D // 2) % D
    # RoPE's transpose: d(out)/d(n) sends g[d]·cos[d] to n[d] and ±g[p]·sin[p] to n[d], p = partner(d), with +
    # for the first half (n[d] enters out[p] as +n[d]·sin[p]) and − for the second (as −n[d]·sin[p])
    sign = tl.where(cols < D // 2, 1.0, -1.0)
    x_off, b, s = _row_offsets(rows, heads, seq, xs_b, xs_s, xs_h)
    g_off, _, _ = _row_offsets(rows, heads, seq, gs_b, gs_s, gs_h)
    c_off = (b * cs_b + s * cs_s)[:, None]
    g = tl.load(g_ptr + g_off[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    g_p = tl.load(g_ptr + g_off[:, None] + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + c_off + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    sin_p = tl.load(sin_ptr + c_off + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    grad_n = g * cos + sign[None, :] * g_p * sin_p  # gradient of the normed row n = x·r·w
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    x_hat = x * r
    w = tl.load(w_ptr + cols).to(tl.float32)[None, :]
    grad_hat = grad_n * w
    dx = r * (grad_hat - x_hat * (tl.sum(grad_hat * x_hat, axis=1) / D)[:, None])
    tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + tl.program_id(0) * D + cols, tl.sum(grad_n * x_hat, axis=0))


def _check(x: torch.Tensor, cos: torch.Tensor) -> None:
    if x.dim() != 4 or x.stride(-1) != 1 or cos.dim() != 3 or cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"norm_rope: x must be [B, S, H, D] with a contiguous last dim and cos/sin [B or 1, S, D]; "
                         f"got x {tuple(x.shape)} (strides {x.stride()}) and cos {tuple(cos.shape)}")


def _broadcast_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch, position) strides of `cos [B or 1, S, D]`, 0 along a broadcast batch."""
    return (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)


def _forward(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """`rope(rms_norm(x) · weight)` as a contiguous `[B, S, H, D]` in `x`'s dtype."""
    _check(x, cos)
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, seq, heads, dim = x.shape
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    num_rows = batch * seq * heads
    if num_rows:
        _norm_rope_fwd_kernel[(triton.cdiv(num_rows, _BLOCK_R),)](
            x, weight, cos, sin, out, num_rows, heads, seq, eps, x.stride(0), x.stride(1), x.stride(2),
            *_broadcast_strides(cos), D=dim, BLOCK_R=_BLOCK_R,
        )
    return out


def _backward(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, grad: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(grad_x [B, S, H, D] contiguous, grad_weight [D] float32)` of `_forward` with upstream `grad` (any
    strides, the last one 1)."""
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, seq, heads, dim = x.shape
    num_rows = batch * seq * heads
    blocks = triton.cdiv(num_rows, _BLOCK_R)
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    partial = torch.empty(blocks, dim, device=x.device, dtype=torch.float32)
    if num_rows:
        _norm_rope_bwd_kernel[(blocks,)](
            x, weight, cos, sin, grad, grad_x, partial, num_rows, heads, seq, eps,
            x.stride(0), x.stride(1), x.stride(2), *_broadcast_strides(cos),
            grad.stride(0), grad.stride(1), grad.stride(2), D=dim, BLOCK_R=_BLOCK_R,
        )
    return grad_x, partial.sum(0)


def _backward_fake(x, weight, cos, sin, grad, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[-1], dtype=torch.float32)


_forward_op = register_kernel_op("norm_rope", _forward, lambda x, weight, cos, sin, eps: x.new_empty(x.shape))
_backward_op = register_kernel_op("norm_rope_backward", _backward, _backward_fake)


class _NormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float):
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps = eps
        return _forward_op(x, weight, cos, sin, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, cos, sin = ctx.saved_tensors
        grad_x, grad_weight = _backward_op(x, weight, cos, sin, grad, ctx.eps)
        return grad_x, grad_weight.to(weight.dtype), None, None, None


def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """`apply_rotary_pos_emb(rms_norm(x, eps) · weight)` per head (float32 inside, one rounding to `x`'s dtype) of
    `x [B, S, H, D]` with Llama's `cos, sin [B or 1, S, D]`: a contiguous `[B, S, H, D]`, differentiable in `x` and
    `weight`. `weight [D]` has `x`'s dtype; D is a power of two."""
    _check(x, cos)
    if weight.shape != (x.shape[-1],) or x.shape[-1] & (x.shape[-1] - 1):
        raise ValueError(f"norm_rope: weight must be [D] with D = {x.shape[-1]} a power of two; got weight "
                         f"{tuple(weight.shape)}")
    return _NormRope.apply(x, weight, cos, sin, eps)
