"""The singleton experts of product-key layers as Triton kernels, wrapped as the custom op
`hf_moe::product_key_experts` (with its fake and its autograd, so torch.compile traces it as one node).

`out[t] = Σⱼ w[t, j] · act(up[e]·x[t]) · down[e]` with `e = index[t, j]`, `up` and `down` two `[E, H]` tables.
Sentinel slots (`e ≥ E`) contribute nothing and get zero gradients; the routing weights come in any float dtype and
are read as float32, so the caller casts and masks nothing.

- Forward, token-centric in two passes (one program per token each): the token's k rows of `up` dotted with x in
  `[k, BLOCK_H]` tiles give the pre-activations `[T, k]` (float32, kept for backward) and the coefficients
  `w · act(pre)`; then the k rows of `down` are summed into the output with those coefficients. Gathered rows are
  never written to memory, and each pass reads one table, whose touched rows then stay in L2 for other tokens.
- Backward, token-centric for the inputs in the same two passes (`g·down[e]` gives the gradients of the routing
  weights and pre-activations and writes the sort keys and coefficients; then `grad_x = Σ grad_pre · up[e]`),
  expert-centric and deterministic for the tables (`product_key_tables`). No host sync anywhere.
- In eager mode the launchers run without the custom ops' dispatch (an `autograd.Function` when gradients are
  needed); while torch.compile or torch.export trace, the custom ops with their registered autograd.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .product_key_tables import table_gradients

ACTIVATIONS = {"silu": 0, "swish": 0, "relu": 1, "relu2": 2}
# (warps, elements of a [k, BLOCK_H] tile) of each token-centric kernel, measured per kernel (H100, k 64, H 1024;
# docs/decisions/product-key-kernels.md): the row dots reduce within a row and hide the gathers' latency best with
# more warps; the combine reduces across the slots, which one warp does without shared memory, on short row pieces
# while its table fits in L2 and on whole 128-byte lines of each row when the rows come from HBM
_DOTS_SHAPE, _INPUT_BACKWARD_SHAPE = (4, 4096), (8, 4096)
_COMBINE_SHAPE, _COMBINE_FROM_HBM_SHAPE = (1, 2048), (1, 4096)


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 0:
        return h / (1.0 + tl.exp(-h))
    elif ACT == 1:
        return tl.maximum(h, 0.0)
    else:
        r = tl.maximum(h, 0.0)
        return r * r


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-h))
        return s * (1.0 + h * (1.0 - s))
    elif ACT == 1:
        return tl.where(h > 0, 1.0, 0.0)
    else:
        return 2.0 * tl.maximum(h, 0.0)


@triton.jit
def _rows_dot(table_ptr, experts, slot_ok, vec_ptr, hidden: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_H: tl.constexpr):
    """`[BLOCK_K]` float32: each slot's table row dotted with the `hidden` vector at `vec_ptr`, tile by tile."""
    cols = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, hidden, BLOCK_H):
        col_ok = start + cols < hidden
        v = tl.load(vec_ptr + start + cols, mask=col_ok, other=0.0).to(tl.float32)
        rows = tl.load(table_ptr + experts[:, None] * hidden + start + cols[None, :],
                       mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(rows * v[None, :], axis=1)
    return acc


@triton.jit
def _store_rows_combined(table_ptr, experts, slot_ok, coeff, out_ptr, hidden: tl.constexpr, BLOCK_H: tl.constexpr):
    """Write `Σ_slots coeff · table[expert]` (the slots' rows weighted, summed) to the `hidden` vector at `out_ptr`."""
    cols = tl.arange(0, BLOCK_H)
    for start in range(0, hidden, BLOCK_H):
        col_ok = start + cols < hidden
        rows = tl.load(table_ptr + experts[:, None] * hidden + start + cols[None, :],
                       mask=slot_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        y = tl.sum(rows * coeff[:, None], axis=0)
        tl.store(out_ptr + start + cols, y.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _token_experts(index_ptr, token, num_experts, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """A token's slots: `(slots, slot_ok, experts int64, live)`; `live` excludes sentinel slots (index ≥
    num_experts), whose rows are never read."""
    slots = tl.arange(0, BLOCK_K)
    slot_ok = slots < TOP_K
    experts = tl.load(index_ptr + token * TOP_K + slots, mask=slot_ok, other=0).to(tl.int64)
    return slots, slot_ok, experts, slot_ok & (experts < num_experts)


@triton.jit
def _token_slots(index_ptr, weight_ptr, token, num_experts, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[`_token_experts`] and the slots' routing weights as float32 (0 on sentinel slots)."""
    slots, slot_ok, experts, live = _token_experts(index_ptr, token, num_experts, TOP_K, BLOCK_K)
    weights = tl.load(weight_ptr + token * TOP_K + slots, mask=live, other=0.0).to(tl.float32)
    return slots, slot_ok, experts, live, weights


@triton.jit
def _pre_activation_kernel(
    x_ptr, up_ptr, index_ptr, weight_ptr, pre_ptr, coeff_ptr, num_experts,
    hidden: tl.constexpr, TOP_K: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward, pass 1: each slot's pre-activation `up[e]·x[t]` and its coefficient `w · act(pre)` (0 on sentinel
    slots)."""
    token = tl.program_id(0).to(tl.int64)
    slots, slot_ok, experts, live, weights = _token_slots(index_ptr, weight_ptr, token, num_experts, TOP_K, BLOCK_K)
    pre = _rows_dot(up_ptr, experts, live, x_ptr + token * hidden, hidden, BLOCK_K, BLOCK_H)
    tl.store(pre_ptr + token * TOP_K + slots, pre, mask=slot_ok)
    tl.store(coeff_ptr + token * TOP_K + slots, tl.where(live, _act(pre, ACT) * weights, 0.0), mask=slot_ok)


@triton.jit
def _combine_kernel(
    table_ptr, index_ptr, coeff_ptr, out_ptr, num_experts,
    hidden: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Pass 2 (forward: `down` and the coefficients; input backward: `up` and the pre-activations' gradients):
    `out[t] = Σ_slots coeff · table[e]`, sentinel slots skipped."""
    token = tl.program_id(0).to(tl.int64)
    slots, _, experts, live = _token_experts(index_ptr, token, num_experts, TOP_K, BLOCK_K)
    coeff = tl.load(coeff_ptr + token * TOP_K + slots, mask=live, other=0.0)
    _store_rows_combined(table_ptr, experts, live, coeff, out_ptr + token * hidden, hidden, BLOCK_H)


@triton.jit
def _input_backward_kernel(
    grad_out_ptr, down_ptr, index_ptr, weight_ptr, pre_ptr, grad_weight_ptr, grad_pre_ptr, key_ptr, coeff_ptr,
    num_experts, hidden: tl.constexpr, TOP_K: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Input backward, pass 1: the gradients of the routing weights and pre-activations from `g · down[e]`, and the
    table gradients' sort keys and coefficients `w · act(pre)`."""
    token = tl.program_id(0).to(tl.int64)
    slots, slot_ok, experts, live, weights = _token_slots(index_ptr, weight_ptr, token, num_experts, TOP_K, BLOCK_K)
    # the table backward's sort keys: the experts, every sentinel as num_experts (fits the key dtype)
    tl.store(key_ptr + token * TOP_K + slots, tl.minimum(experts, num_experts).to(key_ptr.dtype.element_ty),
             mask=slot_ok)
    pre = tl.load(pre_ptr + token * TOP_K + slots, mask=slot_ok, other=0.0)
    grad_act = _rows_dot(down_ptr, experts, live, grad_out_ptr + token * hidden, hidden, BLOCK_K,
                         BLOCK_H)  # g · down[e]
    act = _act(pre, ACT)
    grad_weight = tl.where(live, grad_act * act, 0.0)
    tl.store(grad_weight_ptr + token * TOP_K + slots, grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=slot_ok)
    tl.store(coeff_ptr + token * TOP_K + slots, tl.where(live, act * weights, 0.0), mask=slot_ok)
    grad_pre = tl.where(live, grad_act * weights * _act_grad(pre, ACT), 0.0)
    tl.store(grad_pre_ptr + token * TOP_K + slots, grad_pre, mask=slot_ok)


@functools.cache
def _l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


def _combine_shape(table: torch.Tensor) -> tuple[int, int]:
    """The combine's (warps, tile elements) for rows of `table` (see `_COMBINE_SHAPE`; off CUDA the L2 one)."""
    in_l2 = not table.is_cuda or table.numel() * table.element_size() <= _l2_bytes(table.device)
    return _COMBINE_SHAPE if in_l2 else _COMBINE_FROM_HBM_SHAPE


def _launch(top_k: int, hidden: int, shape: tuple[int, int]) -> dict:
    """A token-centric kernel's block sizes and warps for `shape` = (warps, tile elements)."""
    block_k = max(2, triton.next_power_of_2(top_k))
    block_h = max(16, min(triton.next_power_of_2(hidden), shape[1] // block_k))
    return dict(BLOCK_K=block_k, BLOCK_H=block_h, num_warps=shape[0])


def _experts_forward(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [T, H]`, tables `up`, `down [E, H]`, `index [T, k]` (entries ≥ E are sentinel slots, which contribute
    nothing), `weights [T, k]` (any float dtype, read as float32) → `(out [T, H]` in x's dtype, `pre [T, k]`
    float32 pre-activations, kept for backward`)`."""
    (num_tokens, hidden), top_k = x.shape, index.shape[1]
    x, up, down, index, weights = (t.contiguous() for t in (x, up, down, index, weights))
    out = torch.empty_like(x)
    pre = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)
    if num_tokens:
        coeff = torch.empty_like(pre)
        _pre_activation_kernel[(num_tokens,)](x, up, index, weights, pre, coeff, up.shape[0], hidden, TOP_K=top_k,
                                              ACT=ACTIVATIONS[act], **_launch(top_k, hidden, _DOTS_SHAPE))
        _combine_kernel[(num_tokens,)](down, index, coeff, out, up.shape[0], hidden, TOP_K=top_k,
                                       **_launch(top_k, hidden, _combine_shape(down)))
    return out, pre


product_key_experts_op = torch.library.custom_op("hf_moe::product_key_experts", _experts_forward, mutates_args=())


@product_key_experts_op.register_fake
def _(x, up, down, index, weights, act):
    return x.new_empty(x.shape), x.new_empty(index.shape, dtype=torch.float32)


def _experts_backward(
    grad_out: torch.Tensor, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, index: torch.Tensor,
    weights: torch.Tensor, pre: torch.Tensor, act: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients `(x, up, down, weights)` of [`_experts_forward`]'s output (the weights' in their dtype); the
    tables' gradients are dense `[E, H]` with the untouched rows zero."""
    num_tokens, hidden = x.shape
    top_k = index.shape[1]
    grad_out, x, up, down = grad_out.contiguous(), x.contiguous(), up.contiguous(), down.contiguous()
    index, weights = index.contiguous(), weights.contiguous()
    grad_x = torch.empty_like(x)
    grad_weights = torch.empty_like(weights)
    if not num_tokens:
        return grad_x, torch.zeros_like(up), torch.zeros_like(down), grad_weights
    grad_pre, coeff = (torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device) for _ in range(2))
    # the sort keys (written by the input kernel): every sentinel as E, so all of them sort last
    keys = torch.empty(num_tokens, top_k, dtype=torch.int32 if up.shape[0] < 2**31 else torch.int64, device=x.device)
    _input_backward_kernel[(num_tokens,)](
        grad_out, down, index, weights, pre, grad_weights, grad_pre, keys, coeff, up.shape[0], hidden,
        TOP_K=top_k, ACT=ACTIVATIONS[act], **_launch(top_k, hidden, _INPUT_BACKWARD_SHAPE),
    )
    _combine_kernel[(num_tokens,)](
        up, index, grad_pre, grad_x, up.shape[0], hidden, TOP_K=top_k, **_launch(top_k, hidden, _combine_shape(up)),
    )
    grad_up, grad_down = table_gradients(x, grad_out, keys, grad_pre, coeff, up)
    return grad_x, grad_up, grad_down, grad_weights


product_key_experts_backward = torch.library.custom_op(
    "hf_moe::product_key_experts_backward", _experts_backward, mutates_args=()
)


@product_key_experts_backward.register_fake
def _(grad_out, x, up, down, index, weights, pre, act):
    return x.new_empty(x.shape), up.new_empty(up.shape), down.new_empty(down.shape), weights.new_empty(weights.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, up, down, index, weights, act = inputs
    ctx.save_for_backward(x, up, down, index, weights, output[1])
    ctx.act = act
    ctx.set_materialize_grads(False)  # `pre` gets no gradient: no zeros for it


def _input_grads(ctx, grad_out: torch.Tensor | None, backward) -> tuple:
    """The node's gradients for `(x, up, down, index, weights, act)` from a backward (op or launcher)."""
    if grad_out is None:
        return None, None, None, None, None, None
    grad_x, grad_up, grad_down, grad_weights = backward(grad_out, *ctx.saved_tensors, ctx.act)
    return grad_x, grad_up, grad_down, None, grad_weights, None


def _backward(ctx, grad_out: torch.Tensor | None, _grad_pre: torch.Tensor | None):
    return _input_grads(ctx, grad_out, product_key_experts_backward)


product_key_experts_op.register_autograd(_backward, setup_context=_setup_context)


class _ProductKeyExperts(torch.autograd.Function):
    """The op's forward and backward launchers as one autograd node, for eager training: the same kernels, saved
    tensors and gradients as the op (bit-identical results) without the custom ops' dispatch and their autograd
    wrapper's host time."""

    @staticmethod
    def forward(ctx, x, up, down, index, weights, act: str) -> torch.Tensor:
        output = _experts_forward(x, up, down, index, weights, act)
        _setup_context(ctx, (x, up, down, index, weights, act), output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None):
        return _input_grads(ctx, grad_out, _experts_backward)


def product_key_experts(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, act: str
) -> torch.Tensor:
    """`Σⱼ weights[t, j] · act(up[e]·x[t]) · down[e]` (`e = index[t, j]`; entries ≥ E are sentinel slots, which
    contribute nothing) on CUDA. The custom op (with its autograd) while torch.compile or torch.export trace; in
    eager mode the launchers alone, as an autograd node when gradients are needed, without the op's dispatch."""
    if torch.compiler.is_compiling():
        return product_key_experts_op(x, up, down, index, weights, act)[0]
    if torch.is_grad_enabled() and (x.requires_grad or up.requires_grad or down.requires_grad or weights.requires_grad):
        return _ProductKeyExperts.apply(x, up, down, index, weights, act)
    return _experts_forward(x, up, down, index, weights, act)[0]
