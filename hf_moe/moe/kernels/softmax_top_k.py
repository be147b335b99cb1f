"""The default router's softmax → top-k → renormalisation as one Triton kernel, and its backward as another.

In eager training the router is a dozen small kernels forward and as many backward (softmax, top-k, sum, divide,
gather, softmax backward, ...), and with many experts `torch.topk` over `[T, E]` dominates its GPU time
(docs/decisions/fused-router-top-k.md). Here one program handles a block of tokens with all E probabilities in
registers: it writes the probabilities (the aux loss and backward read them), the k chosen experts and their
weights. Backward recomputes only the weights' normaliser and writes the logits' gradient, from the weights'
gradient and, when the aux loss is in the graph, the probabilities'.

Ties between equal probabilities go to the lower expert index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .library import register_kernel_op


@triton.jit
def _softmax_top_k_kernel(
    logits_ptr, probs_ptr, index_ptr, weights_ptr, num_tokens, num_experts,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    token_ok = tokens < num_tokens
    col_ok = cols < num_experts
    offs = tokens.to(tl.int64)[:, None] * num_experts + cols[None, :]
    mask = token_ok[:, None] & col_ok[None, :]
    logits = tl.load(logits_ptr + offs, mask=mask, other=-float("inf"))
    logits = tl.where(token_ok[:, None], logits, 0.0)  # rows past the end: finite, never stored
    shifted = logits - tl.max(logits, axis=1)[:, None]
    numerator = tl.exp(shifted)
    probs = numerator / tl.sum(numerator, axis=1)[:, None]
    tl.store(probs_ptr + offs, probs, mask=mask)
    remaining = tl.where(col_ok[None, :], probs, -1.0)
    slots = tl.arange(0, BLOCK_K)
    chosen = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    values = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)
        # lowest column holding the maximum
        best_col = tl.min(tl.where(remaining == best[:, None], cols[None, :], BLOCK_E), axis=1)
        remaining = tl.where(cols[None, :] == best_col[:, None], -1.0, remaining)
        chosen = tl.where(slots[None, :] == slot, best_col.to(tl.int64)[:, None], chosen)
        values = tl.where(slots[None, :] == slot, best[:, None], values)
    if NORMALIZE:
        values = values / (tl.sum(values, axis=1)[:, None] + 1e-20)
    out_offs = tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    out_mask = token_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(index_ptr + out_offs, chosen, mask=out_mask)
    tl.store(weights_ptr + out_offs, values, mask=out_mask)


@triton.jit
def _softmax_top_k_backward_kernel(
    probs_ptr, index_ptr, weights_ptr, grad_weights_ptr, grad_probs_ptr, grad_logits_ptr, num_tokens, num_experts,
    grad_probs_stride_t, grad_probs_stride_e,
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    token_ok = tokens < num_tokens
    col_ok = cols < num_experts
    rows64 = tokens.to(tl.int64)
    mask = token_ok[:, None] & col_ok[None, :]
    probs = tl.load(probs_ptr + rows64[:, None] * num_experts + cols[None, :], mask=mask, other=0.0)
    if HAS_GRAD_PROBS:
        grad = tl.load(
            grad_probs_ptr + rows64[:, None] * grad_probs_stride_t + cols[None, :] * grad_probs_stride_e,
            mask=mask, other=0.0,
        ).to(tl.float32)
    else:
        grad = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if NORMALIZE:  # w_i = p_i / S with S = Σ chosen p (+ε): dL/dp_i = (g_i − Σ_j g_j·w_j) / S
        chosen_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
        weighted = tl.zeros([BLOCK_T], dtype=tl.float32)
        for slot in tl.static_range(TOP_K):
            expert = tl.load(index_ptr + rows64 * TOP_K + slot, mask=token_ok, other=0)
            chosen_sum += tl.sum(tl.where(cols[None, :] == expert[:, None], probs, 0.0), axis=1)
            weight = tl.load(weights_ptr + rows64 * TOP_K + slot, mask=token_ok, other=0.0)
            grad_weight = tl.load(grad_weights_ptr + rows64 * TOP_K + slot, mask=token_ok, other=0.0).to(tl.float32)
            weighted += grad_weight * weight
        chosen_sum += 1e-20
    for slot in tl.static_range(TOP_K):
        expert = tl.load(index_ptr + rows64 * TOP_K + slot, mask=token_ok, other=0)
        grad_weight = tl.load(grad_weights_ptr + rows64 * TOP_K + slot, mask=token_ok, other=0.0).to(tl.float32)
        if NORMALIZE:
            grad_weight = (grad_weight - weighted) / chosen_sum
        grad += tl.where(cols[None, :] == expert[:, None], grad_weight[:, None], 0.0)
    grad_logits = probs * (grad - tl.sum(grad * probs, axis=1)[:, None])
    tl.store(grad_logits_ptr + rows64[:, None] * num_experts + cols[None, :], grad_logits, mask=mask)


def _blocks(num_experts: int) -> tuple[int, int]:
    block_e = triton.next_power_of_2(num_experts)
    return max(1, min(64, 4096 // block_e)), block_e


def _forward(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = logits.contiguous()
    num_tokens, num_experts = logits.shape
    probs = torch.empty_like(logits)
    index = torch.empty(num_tokens, top_k, device=logits.device, dtype=torch.int64)
    weights = torch.empty(num_tokens, top_k, device=logits.device, dtype=torch.float32)
    block_t, block_e = _blocks(num_experts)
    _softmax_top_k_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, probs, index, weights, num_tokens, num_experts,
        TOP_K=top_k, NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=max(2, triton.next_power_of_2(top_k)),
    )
    return probs, index, weights


def _forward_fake(logits, top_k, normalize):
    num_tokens = logits.shape[0]
    return (torch.empty_like(logits, memory_format=torch.contiguous_format),
            logits.new_empty(num_tokens, top_k, dtype=torch.int64),
            logits.new_empty(num_tokens, top_k, dtype=torch.float32))


def _backward(
    probs: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    grad_weights: torch.Tensor,
    grad_probs: torch.Tensor | None,
    normalize: bool,
) -> torch.Tensor:
    num_tokens, num_experts = probs.shape
    top_k = index.shape[1]
    grad_weights = grad_weights.contiguous()
    grad_logits = torch.empty_like(probs)
    block_t, block_e = _blocks(num_experts)
    has_grad_probs = grad_probs is not None
    _softmax_top_k_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
        probs, index, weights, grad_weights, grad_probs if has_grad_probs else probs, grad_logits,
        num_tokens, num_experts,
        *(grad_probs.stride() if has_grad_probs else (0, 0)),
        TOP_K=top_k, NORMALIZE=normalize, HAS_GRAD_PROBS=has_grad_probs, BLOCK_T=block_t, BLOCK_E=block_e,
    )
    return grad_logits


_forward_op = register_kernel_op("softmax_top_k", _forward, _forward_fake)
_backward_op = register_kernel_op(
    "softmax_top_k_backward", _backward, lambda probs, *_: torch.empty_like(probs)
)


class _SoftmaxTopK(torch.autograd.Function):
    """`logits [T, E]` float32 → `probs [T, E]`, `top_k_index [T, k]` int64, `top_k_weights [T, k]` float32 (the
    chosen probabilities, renormalised to sum to 1 when `normalize`). Differentiable in `probs` and the weights."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int, normalize: bool):
        probs, index, weights = _forward_op(logits, top_k, normalize)
        ctx.save_for_backward(probs, index, weights)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(index)
        return probs, index, weights

    @staticmethod
    def backward(ctx, grad_probs: torch.Tensor | None, _grad_index, grad_weights: torch.Tensor | None):
        probs, index, weights = ctx.saved_tensors
        if grad_weights is None:
            grad_weights = torch.zeros_like(weights)
        return _backward_op(probs, index, weights, grad_weights, grad_probs, ctx.normalize), None, None


def softmax_top_k(
    logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`logits [T, E]` float32 on CUDA → `(probs [T, E], top_k_index [T, k] int64, top_k_weights [T, k] float32)`:
    the softmax, its k largest entries, and those entries (renormalised to sum to 1 when `normalize`). Without
    gradients (inference) the kernel runs as it is, without the autograd Function's host cost."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _SoftmaxTopK.apply(logits, top_k, normalize)
    return _forward_op(logits, top_k, normalize)
