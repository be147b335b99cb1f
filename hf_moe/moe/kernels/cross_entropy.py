"""Cross-entropy over the vocabulary, forward and backward, reading the logits in their own dtype.

`F.cross_entropy(logits.float(), ...)` (transformers' `ForCausalLMLoss`) writes a float32 copy of `[N, V]` logits
and reads it twice forward and again backward. Here forward reads the bf16/fp16/fp32 logits once (online max and
sum of exponentials in float32 over blocks of the vocabulary) and keeps one float32 per row, the log-sum-exp;
backward reads them once more and writes the gradient in their dtype. One program handles one row. Under
torch.compile the backward is the same formula in torch ops, which inductor fuses with any other gradient that adds
into the logits (a model's returned logits: their zero gradient).

Rows whose target is `ignore_index` have loss 0 and gradient 0 (their logits are not read backward). A target
outside `[0, V)` that is not `ignore_index` gives a NaN loss, which needs no host sync to report (torch raises a
device-side assertion instead). The per-row gradient `g` is read on the device, so the mean's and
`num_items_in_batch`'s divisions stay in torch and nothing waits for the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CROSS_ENTROPY_DTYPES
from .library import register_kernel_op


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr, target_ptr, loss_ptr, lse_ptr, row_stride, vocab_size, ignore_index, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    # Online log-sum-exp: `m` is the running max, `s` the sum of exp(x - shift) with shift = m, or 0 while m is
    # -inf (so exp(-inf - shift) is 0, never NaN); each block rescales `s` by exp(m_old - shift_new).
    x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    shift = tl.where(m == -float("inf"), 0.0, m)
    s = tl.sum(tl.exp(x - shift), axis=0)
    for start in range(BLOCK_V, vocab_size, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < vocab_size, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift_new = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - shift_new) + tl.sum(tl.exp(x - shift_new), axis=0)
        m = m_new
        shift = shift_new
    lse = shift + tl.log(s)
    target = tl.load(target_ptr + row)
    in_range = (target >= 0) & (target < vocab_size)
    target_logit = tl.load(row_ptr + target, mask=in_range, other=float("nan")).to(tl.float32)
    loss = tl.where(target == ignore_index, 0.0, lse - target_logit)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr, target_ptr, lse_ptr, grad_loss_ptr, grad_logits_ptr, row_stride, grad_loss_stride, vocab_size,
    ignore_index, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    out_ptr = grad_logits_ptr + row * vocab_size
    target = tl.load(target_ptr + row)
    active = target != ignore_index
    # an ignored row's g may be inf or NaN (the mean over no rows): its gradient is 0 all the same
    g = tl.where(active, tl.load(grad_loss_ptr + row * grad_loss_stride).to(tl.float32), 0.0)
    lse = tl.load(lse_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, vocab_size, BLOCK_V):
        col = start + cols
        mask = col < vocab_size
        x = tl.load(row_ptr + col, mask=mask & active, other=-float("inf")).to(tl.float32)
        grad = g * (tl.exp(x - lse) - tl.where(col == target, 1.0, 0.0))
        grad = tl.where(active, grad, 0.0)
        tl.store(out_ptr + col, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _launch_config(vocab_size: int) -> tuple[int, int]:
    """`(BLOCK_V, num_warps)`: blocks of up to 4096 columns, 16 per thread at 8 warps."""
    block = min(4096, triton.next_power_of_2(vocab_size))
    return block, max(1, min(8, block // 512))


def _forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp (float32 `[N]` each) of `logits [N, V]` (any row stride) against
    `target [N]`."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    num_rows, vocab_size = logits.shape
    loss = torch.empty(num_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if num_rows:
        block, warps = _launch_config(vocab_size)
        _cross_entropy_fwd_kernel[(num_rows,)](
            logits, target, loss, lse, logits.stride(0), vocab_size, ignore_index, BLOCK_V=block, num_warps=warps,
        )
    return loss, lse


def _forward_fake(logits, target, ignore_index):
    num_rows = logits.shape[0]
    return logits.new_empty(num_rows, dtype=torch.float32), logits.new_empty(num_rows, dtype=torch.float32)


def _backward(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """`grad_logits [N, V]` (contiguous, the logits' dtype) of the per-row loss with upstream `grad_loss [N]`."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    num_rows, vocab_size = logits.shape
    grad_logits = torch.empty(num_rows, vocab_size, device=logits.device, dtype=logits.dtype)
    if num_rows:
        block, warps = _launch_config(vocab_size)
        _cross_entropy_bwd_kernel[(num_rows,)](
            logits, target, lse, grad_loss, grad_logits, logits.stride(0), grad_loss.stride(0), vocab_size,
            ignore_index, BLOCK_V=block, num_warps=warps,
        )
    return grad_logits


def _backward_traced(
    logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, grad_loss: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The backward kernel's result in torch ops, for torch.compile: one pointwise pass over `[N, V]` that inductor
    fuses with whatever else adds into the logits' gradient (in a model, the zero gradient of the logits it
    returns), which a custom op's kernel cannot take in: that sum would be one more read and write of `[N, V]`."""
    active = (target != ignore_index)[:, None]
    cols = torch.arange(logits.shape[1], device=logits.device)
    probs = torch.exp(logits.float() - lse[:, None])
    grad = grad_loss[:, None] * (probs - (cols == target[:, None]).float())
    return torch.where(active, grad, 0.0).to(logits.dtype)


_forward_op = register_kernel_op("cross_entropy_forward", _forward, _forward_fake)
_backward_op = register_kernel_op(
    "cross_entropy_backward", _backward,
    lambda logits, target, lse, grad_loss, ignore_index: logits.new_empty(logits.shape),
)


class _CrossEntropy(torch.autograd.Function):
    """`logits [N, V]`, `target [N]` → per-row loss `[N]` float32 (0 where `target == ignore_index`);
    differentiable in the logits."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
        loss, lse = _forward_op(logits, target, ignore_index)
        ctx.save_for_backward(logits, target, lse)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, target, lse = ctx.saved_tensors
        backward = _backward_traced if torch.compiler.is_compiling() else _backward_op
        return backward(logits, target, lse, grad_loss, ctx.ignore_index), None, None


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-row cross-entropy `logsumexp(logits[i]) - logits[i, target[i]]` (float32 `[N]`, 0 where
    `target[i] == ignore_index`) of `logits [N, V]` (bf16, fp16 or fp32; read in place at any row stride when the
    last dim is contiguous, copied otherwise) against `target [N]`, differentiable in the logits."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_rows: logits must be [N, V] and target [N]; got logits "
                         f"{tuple(logits.shape)} and target {tuple(target.shape)}")
    if logits.dtype not in CROSS_ENTROPY_DTYPES:
        raise ValueError(f"cross_entropy_rows: logits dtype {logits.dtype} is not one of {CROSS_ENTROPY_DTYPES}")
    return _CrossEntropy.apply(logits, target, ignore_index)
