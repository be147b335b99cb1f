"""Per-head RMSNorm followed by RoPE (Qwen3's q/k norm), forward and backward, one pass over the heads each way.

Forward reads a head's row once (rounding once, to the input's dtype, after RoPE); backward reads the row and its
gradient once and writes the input's gradient, and sums the weight's gradient per 128 rows (a float32 `[blocks, D]`
that torch reduces). A head is handled as its two halves, the pairs `rotate_half` rotates, so no value is loaded
twice. Under torch.compile both are custom ops: inductor's kernels for the same operators re-read and write the
normalised rows between the norm's backward and RoPE's, and reduce the weight's gradient apart
(docs/decisions/compile.md, "q/k norm and RoPE in one kernel").

Rows are the `[B, S, H]` heads of `x [B, S, H, D]` (any strides, the last one 1); `cos, sin [B or 1, S, D]` are
Llama's (`rotate_half` pairs the two halves of a head), broadcast over the heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .library import register_kernel_op

# Launch shapes (rows = heads per block): few registers per thread, so many blocks per SM keep loads in flight.
# Backward walks _BWD_CHUNKS blocks per program, summing the weight's gradient in registers: 128 rows per float32
# partial row. An H100 sweep of rows, chunks and warps put these within the sweep's noise of its best
# (docs/decisions/compile.md, "q/k norm and RoPE in one kernel").
_FWD_ROWS, _FWD_WARPS = 8, 4
_BWD_ROWS, _BWD_CHUNKS, _BWD_WARPS = 8, 16, 4


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
    # Each head as its two halves (lo, hi), the pairs RoPE rotates: out_lo = n_lo·cos_lo − n_hi·sin_lo and
    # out_hi = n_hi·cos_hi + n_lo·sin_hi, n = x·r·w the normed row.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = (rows < num_rows)[:, None]
    lo = tl.arange(0, D // 2)[None, :]
    hi = lo + D // 2
    x_off, b, s = _row_offsets(rows, heads, seq, xs_b, xs_s, xs_h)
    x_ptrs = x_ptr + x_off[:, None]
    c_off = (b * cs_b + s * cs_s)[:, None]
    x_lo = tl.load(x_ptrs + lo, mask=ok, other=0.0).to(tl.float32)
    x_hi = tl.load(x_ptrs + hi, mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(x_lo * x_lo, axis=1) + tl.sum(x_hi * x_hi, axis=1)) / D + eps)[:, None]
    n_lo = x_lo * r * tl.load(w_ptr + lo).to(tl.float32)
    n_hi = x_hi * r * tl.load(w_ptr + hi).to(tl.float32)
    cos_lo = tl.load(cos_ptr + c_off + lo, mask=ok, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos_ptr + c_off + hi, mask=ok, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin_ptr + c_off + lo, mask=ok, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin_ptr + c_off + hi, mask=ok, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * D
    tl.store(out_ptrs + lo, (n_lo * cos_lo - n_hi * sin_lo).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptrs + hi, (n_hi * cos_hi + n_lo * sin_hi).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _norm_rope_bwd_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, g_ptr, dx_ptr, dw_ptr, num_rows, heads, seq, eps,
    xs_b, xs_s, xs_h, cs_b, cs_s, gs_b, gs_s, gs_h, D: tl.constexpr, BLOCK_R: tl.constexpr, CHUNKS: tl.constexpr,
):
    lo = tl.arange(0, D // 2)[None, :]
    hi = lo + D // 2
    w_lo = tl.load(w_ptr + lo).to(tl.float32)
    w_hi = tl.load(w_ptr + hi).to(tl.float32)
    # the weight's gradient per element of the block, summed over rows once at the end (no reduction per chunk)
    grad_w_lo = tl.zeros([BLOCK_R, D // 2], dtype=tl.float32)
    grad_w_hi = tl.zeros([BLOCK_R, D // 2], dtype=tl.float32)
    for chunk in range(CHUNKS):
        rows = (tl.program_id(0).to(tl.int64) * CHUNKS + chunk) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = (rows < num_rows)[:, None]
        x_off, b, s = _row_offsets(rows, heads, seq, xs_b, xs_s, xs_h)
        g_off, _, _ = _row_offsets(rows, heads, seq, gs_b, gs_s, gs_h)
        x_ptrs, g_ptrs = x_ptr + x_off[:, None], g_ptr + g_off[:, None]
        c_off = (b * cs_b + s * cs_s)[:, None]
        # RoPE's transpose: the gradient of the normed row is (g_lo·cos_lo + g_hi·sin_hi, g_hi·cos_hi − g_lo·sin_lo)
        g_lo = tl.load(g_ptrs + lo, mask=ok, other=0.0).to(tl.float32)
        g_hi = tl.load(g_ptrs + hi, mask=ok, other=0.0).to(tl.float32)
        grad_lo = (g_lo * tl.load(cos_ptr + c_off + lo, mask=ok, other=0.0).to(tl.float32)
                   + g_hi * tl.load(sin_ptr + c_off + hi, mask=ok, other=0.0).to(tl.float32))
        grad_hi = (g_hi * tl.load(cos_ptr + c_off + hi, mask=ok, other=0.0).to(tl.float32)
                   - g_lo * tl.load(sin_ptr + c_off + lo, mask=ok, other=0.0).to(tl.float32))
        # the norm's backward: n = x̂·w with x̂ = x·r, dx = r·(dx̂ − x̂·mean(dx̂·x̂)), dx̂ = dn·w, dw = Σ dn·x̂
        x_lo = tl.load(x_ptrs + lo, mask=ok, other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptrs + hi, mask=ok, other=0.0).to(tl.float32)
        r = tl.rsqrt((tl.sum(x_lo * x_lo, axis=1) + tl.sum(x_hi * x_hi, axis=1)) / D + eps)[:, None]
        x_lo, x_hi = x_lo * r, x_hi * r
        d_lo, d_hi = grad_lo * w_lo, grad_hi * w_hi
        mean = ((tl.sum(d_lo * x_lo, axis=1) + tl.sum(d_hi * x_hi, axis=1)) / D)[:, None]
        dx_ptrs = dx_ptr + rows[:, None] * D
        tl.store(dx_ptrs + lo, (r * (d_lo - x_lo * mean)).to(dx_ptr.dtype.element_ty), mask=ok)
        tl.store(dx_ptrs + hi, (r * (d_hi - x_hi * mean)).to(dx_ptr.dtype.element_ty), mask=ok)
        grad_w_lo += grad_lo * x_lo
        grad_w_hi += grad_hi * x_hi
    dw_ptrs = dw_ptr + tl.program_id(0) * D + tl.arange(0, D // 2)
    tl.store(dw_ptrs, tl.sum(grad_w_lo, axis=0))
    tl.store(dw_ptrs + D // 2, tl.sum(grad_w_hi, axis=0))


def _check(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The kernels read `cos`/`sin` at `(b or 0, s)` for every row of `x`: any other shape would read past them."""
    batch, seq, dim = (*x.shape[:2], x.shape[-1]) if x.dim() == 4 else (None, None, None)
    if (x.dim() != 4 or x.stride(-1) != 1 or cos.shape != sin.shape or cos.dim() != 3
            or cos.shape[0] not in (1, batch) or cos.shape[1:] != (seq, dim)):
        raise ValueError(f"norm_rope: x must be [B, S, H, D] with a contiguous last dim and cos/sin [B or 1, S, D]; "
                         f"got x {tuple(x.shape)} (strides {x.stride()}), cos {tuple(cos.shape)} and sin "
                         f"{tuple(sin.shape)}")
    if weight.shape != (dim,) or dim & (dim - 1):
        raise ValueError(f"norm_rope: weight must be [D] with D = {dim} a power of two; got weight "
                         f"{tuple(weight.shape)}")


def _broadcast_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch, position) strides of `cos [B or 1, S, D]`, 0 along a broadcast batch."""
    return (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)


def _forward(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """`rope(rms_norm(x) · weight)` as a contiguous `[B, S, H, D]` in `x`'s dtype (shapes checked by `norm_rope`)."""
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, seq, heads, dim = x.shape
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    num_rows = batch * seq * heads
    if num_rows:
        _norm_rope_fwd_kernel[(triton.cdiv(num_rows, _FWD_ROWS),)](
            x, weight, cos, sin, out, num_rows, heads, seq, eps, x.stride(0), x.stride(1), x.stride(2),
            *_broadcast_strides(cos), D=dim, BLOCK_R=_FWD_ROWS, num_warps=_FWD_WARPS,
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
    blocks = triton.cdiv(num_rows, _BWD_ROWS * _BWD_CHUNKS)
    grad_x = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    partial = torch.empty(blocks, dim, device=x.device, dtype=torch.float32)
    if num_rows:
        _norm_rope_bwd_kernel[(blocks,)](
            x, weight, cos, sin, grad, grad_x, partial, num_rows, heads, seq, eps,
            x.stride(0), x.stride(1), x.stride(2), *_broadcast_strides(cos),
            grad.stride(0), grad.stride(1), grad.stride(2), D=dim,
            BLOCK_R=_BWD_ROWS, CHUNKS=_BWD_CHUNKS, num_warps=_BWD_WARPS,
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
    _check(x, weight, cos, sin)
    return _NormRope.apply(x, weight, cos, sin, eps)
