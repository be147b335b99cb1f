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
  weights and pre-activations and writes the sort keys; then `grad_x = Σ grad_pre · up[e]`), expert-centric for
  the tables: the (token, slot) pairs sorted by expert (stable, on the device), the first sorted position of each
  expert's run sums the run in sorted order and writes the expert's two rows; long runs go to a second kernel that
  splits their columns over programs. Rows of experts without tokens stay zero. Every row is summed by one program
  in a fixed order (the only atomic lists the long runs): deterministic, and no host sync anywhere.
- In eager mode the launchers run without the custom ops' dispatch (an `autograd.Function` when gradients are
  needed); while torch.compile or torch.export trace, the custom ops with their registered autograd.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "swish": 0, "relu": 1, "relu2": 2}
# sorted positions per table-backward program: most start no run, and a few per program keep far more programs
# than the GPU holds at a time (one per position would be mostly programs that exit at once)
_POSITIONS_PER_PROGRAM = 8
# runs of ≥ `_LONG_RUN` pairs of one expert are summed by programs that each take `_LONG_RUN_COLUMNS` columns and
# `_LONG_RUN_ROWS` pairs at a time: a router sending most tokens to few experts would leave a few serial programs
_LONG_RUN, _LONG_RUN_COLUMNS, _LONG_RUN_ROWS = 256, 128, 32
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
    grad_out_ptr, down_ptr, index_ptr, weight_ptr, pre_ptr, grad_weight_ptr, grad_pre_ptr, key_ptr, num_experts,
    hidden: tl.constexpr, TOP_K: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Input backward, pass 1: the gradients of the routing weights and pre-activations from `g · down[e]`, and the
    table backward's sort keys."""
    token = tl.program_id(0).to(tl.int64)
    slots, slot_ok, experts, live, weights = _token_slots(index_ptr, weight_ptr, token, num_experts, TOP_K, BLOCK_K)
    # the table backward's sort keys: the experts, every sentinel as num_experts (fits the key dtype)
    tl.store(key_ptr + token * TOP_K + slots, tl.minimum(experts, num_experts).to(key_ptr.dtype.element_ty),
             mask=slot_ok)
    pre = tl.load(pre_ptr + token * TOP_K + slots, mask=slot_ok, other=0.0)
    grad_act = _rows_dot(down_ptr, experts, live, grad_out_ptr + token * hidden, hidden, BLOCK_K,
                         BLOCK_H)  # g · down[e]
    grad_weight = tl.where(live, grad_act * _act(pre, ACT), 0.0)
    tl.store(grad_weight_ptr + token * TOP_K + slots, grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=slot_ok)
    grad_pre = tl.where(live, grad_act * weights * _act_grad(pre, ACT), 0.0)
    tl.store(grad_pre_ptr + token * TOP_K + slots, grad_pre, mask=slot_ok)


@triton.jit
def _store_run_gradients(
    x_ptr, grad_out_ptr, order_ptr, pre_ptr, weight_ptr, grad_pre_ptr, grad_up_ptr, grad_down_ptr, start, end, row,
    cols, hidden: tl.constexpr, TOP_K: tl.constexpr, ACT: tl.constexpr,
):
    """One expert's two table-gradient rows over the columns `cols`: its run's pairs (sorted positions
    `start..end`) summed in sorted order."""
    col_ok = cols < hidden
    grad_up = tl.zeros(cols.shape, dtype=tl.float32)
    grad_down = tl.zeros(cols.shape, dtype=tl.float32)
    for position in range(start, end):
        pair = tl.load(order_ptr + position)
        token = pair // TOP_K
        grad_pre = tl.load(grad_pre_ptr + pair)
        coeff = _act(tl.load(pre_ptr + pair), ACT) * tl.load(weight_ptr + pair).to(tl.float32)
        x = tl.load(x_ptr + token * hidden + cols, mask=col_ok, other=0.0).to(tl.float32)
        g = tl.load(grad_out_ptr + token * hidden + cols, mask=col_ok, other=0.0).to(tl.float32)
        grad_up += grad_pre * x
        grad_down += coeff * g
    tl.store(grad_up_ptr + row + cols, grad_up.to(grad_up_ptr.dtype.element_ty), mask=col_ok)
    tl.store(grad_down_ptr + row + cols, grad_down.to(grad_down_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _table_backward_kernel(
    x_ptr, grad_out_ptr, order_ptr, sorted_expert_ptr, pre_ptr, weight_ptr, grad_pre_ptr, grad_up_ptr, grad_down_ptr,
    long_runs_ptr, num_pairs, num_experts, hidden: tl.constexpr, TOP_K: tl.constexpr, ACT: tl.constexpr,
    BLOCK_H: tl.constexpr, POSITIONS: tl.constexpr, BLOCK_SCAN: tl.constexpr, LONG_RUN: tl.constexpr,
):
    first = tl.program_id(0) * POSITIONS
    for start in range(first, tl.minimum(first + POSITIONS, num_pairs)):
        expert = tl.load(sorted_expert_ptr + start)
        previous = tl.load(sorted_expert_ptr + start - 1, mask=start > 0, other=-1)
        # the first position of an expert's run owns the run; the others (and the sentinels' positions) do nothing
        if (expert < num_experts) & (expert != previous):
            scan = tl.arange(0, BLOCK_SCAN)
            end = start + 1
            step = tl.full([], BLOCK_SCAN, tl.int32)
            while step == BLOCK_SCAN:  # the run ends at the first position of another expert (or at num_pairs)
                ahead = tl.load(sorted_expert_ptr + end + scan, mask=end + scan < num_pairs, other=num_experts)
                step = tl.min(tl.where(ahead == expert, BLOCK_SCAN, scan))
                end += step
            if end - start >= LONG_RUN:  # listed for the long-run kernel, which splits its columns over programs
                slot = tl.atomic_add(long_runs_ptr, 1)
                tl.store(long_runs_ptr + 1 + 2 * slot, start)
                tl.store(long_runs_ptr + 2 + 2 * slot, end)
            else:
                row = expert.to(tl.int64) * hidden
                for col in range(0, hidden, BLOCK_H):
                    _store_run_gradients(x_ptr, grad_out_ptr, order_ptr, pre_ptr, weight_ptr, grad_pre_ptr,
                                         grad_up_ptr, grad_down_ptr, start, end, row, col + tl.arange(0, BLOCK_H),
                                         hidden, TOP_K, ACT)


@triton.jit
def _long_run_table_backward_kernel(
    x_ptr, grad_out_ptr, order_ptr, sorted_expert_ptr, pre_ptr, weight_ptr, grad_pre_ptr, grad_up_ptr, grad_down_ptr,
    long_runs_ptr, hidden: tl.constexpr, TOP_K: tl.constexpr, ACT: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The listed long runs (program axis 0, strided) × column slices (axis 1): a run's pairs `ROWS` at a time as
    `[ROWS, BLOCK_H]` tiles, each tile summed over its rows, the tiles in sorted order."""
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    rows = tl.arange(0, ROWS)
    for run in range(tl.program_id(0), tl.load(long_runs_ptr), tl.num_programs(0)):
        start = tl.load(long_runs_ptr + 1 + 2 * run)
        end = tl.load(long_runs_ptr + 2 + 2 * run)
        row = tl.load(sorted_expert_ptr + start).to(tl.int64) * hidden
        grad_up = tl.zeros([BLOCK_H], dtype=tl.float32)
        grad_down = tl.zeros([BLOCK_H], dtype=tl.float32)
        for first in range(start, end, ROWS):
            row_ok = first + rows < end
            pair = tl.load(order_ptr + first + rows, mask=row_ok, other=0)
            token = (pair // TOP_K).to(tl.int64)
            grad_pre = tl.load(grad_pre_ptr + pair, mask=row_ok, other=0.0)
            coeff = tl.where(row_ok, _act(tl.load(pre_ptr + pair, mask=row_ok, other=0.0), ACT)
                             * tl.load(weight_ptr + pair, mask=row_ok, other=0.0).to(tl.float32), 0.0)
            tile_ok = row_ok[:, None] & col_ok[None, :]
            offsets = token[:, None] * hidden + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
            g = tl.load(grad_out_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
            grad_up += tl.sum(grad_pre[:, None] * x, axis=0)
            grad_down += tl.sum(coeff[:, None] * g, axis=0)
        tl.store(grad_up_ptr + row + cols, grad_up.to(grad_up_ptr.dtype.element_ty), mask=col_ok)
        tl.store(grad_down_ptr + row + cols, grad_down.to(grad_down_ptr.dtype.element_ty), mask=col_ok)


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
    grad_up, grad_down = torch.zeros_like(up), torch.zeros_like(down)
    if not num_tokens:
        return grad_x, grad_up, grad_down, grad_weights
    grad_pre = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)
    # the sort keys (written by the input kernel): every sentinel as E, so all of them sort last
    keys = torch.empty(num_tokens, top_k, dtype=torch.int32 if up.shape[0] < 2**31 else torch.int64, device=x.device)
    code = ACTIVATIONS[act]
    _input_backward_kernel[(num_tokens,)](
        grad_out, down, index, weights, pre, grad_weights, grad_pre, keys, up.shape[0], hidden,
        TOP_K=top_k, ACT=code, **_launch(top_k, hidden, _INPUT_BACKWARD_SHAPE),
    )
    _combine_kernel[(num_tokens,)](
        up, index, grad_pre, grad_x, up.shape[0], hidden, TOP_K=top_k, **_launch(top_k, hidden, _combine_shape(up)),
    )
    # expert-centric table gradients (module docstring); long runs listed for the second kernel
    num_pairs = num_tokens * top_k
    sorted_expert, order = torch.sort(keys.view(-1), stable=True)
    max_long_runs = num_pairs // _LONG_RUN
    long_runs = torch.zeros(1 + 2 * max_long_runs, dtype=torch.int32, device=x.device)  # [count, (start, end)...]
    _table_backward_kernel[(triton.cdiv(num_pairs, _POSITIONS_PER_PROGRAM),)](
        x, grad_out, order, sorted_expert, pre, weights, grad_pre, grad_up, grad_down, long_runs, num_pairs,
        up.shape[0], hidden, TOP_K=top_k, ACT=code, BLOCK_H=min(triton.next_power_of_2(hidden), 1024),
        POSITIONS=_POSITIONS_PER_PROGRAM, BLOCK_SCAN=64, LONG_RUN=_LONG_RUN,
    )
    if max_long_runs:
        slice_h = min(triton.next_power_of_2(hidden), _LONG_RUN_COLUMNS)
        _long_run_table_backward_kernel[(min(max_long_runs, 1024), triton.cdiv(hidden, slice_h))](
            x, grad_out, order, sorted_expert, pre, weights, grad_pre, grad_up, grad_down, long_runs, hidden,
            TOP_K=top_k, ACT=code, ROWS=_LONG_RUN_ROWS, BLOCK_H=slice_h,
        )
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
