"""The routed experts for few tokens per expert (decode): two weight-streaming Triton kernels.

At a few rows per expert the expert GEMMs are bound by reading the expert weights, and the general path's
separate gather, SwiGLU and 128-row GEMM tiles add kernels and partial waves on top. Here one kernel reads the
token rows straight from the hidden states (no gathered copy), streams each expert's gate and up weights once per
block of rows and applies SwiGLU and the routing weight before it stores; a second streams the down weights.
The combine is the general path's deterministic gather-sum. Forward only: it serves inference (no autograd).

Rows are (token, slot) pairs sorted by expert (`order`, `offsets` from `hf_moe.moe.experts.grouped.sort_by_expert`);
the grid is (expert, column block) and every program reads its expert's row range from `offsets` on the device,
so nothing synchronises with the host and the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gather import gather_sum
from .library import register_kernel_op

# Column and reduction block sizes and warps, chosen on an H200 at the Qwen3-30B-A3B, Mixtral and DeepSeek-V3
# decode shapes (docs/decisions/decode-kernels.md).
_BLOCK_N, _BLOCK_K, _NUM_WARPS, _NUM_STAGES = 64, 128, 4, 3


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, order_ptr, top_k_weights_ptr, w_ptr, out_ptr, offsets_ptr,
    hidden, inter, x_stride, w_stride_e, w_stride_n, w_stride_k,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_ptr + expert)
    w_gate = w_ptr + expert.to(tl.int64) * w_stride_e + cols[None, :].to(tl.int64) * w_stride_n
    w_up = w_gate + inter * w_stride_n
    for row_start in range(start, end, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        slot = tl.load(order_ptr + rows, mask=row_ok, other=0)
        x_rows = x_ptr + (slot // TOP_K).to(tl.int64)[:, None] * x_stride
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, hidden, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden
            a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            w_offs = ks[:, None].to(tl.int64) * w_stride_k
            gate = tl.dot(a, tl.load(w_gate + w_offs, mask=w_mask, other=0.0), gate)
            up = tl.dot(a, tl.load(w_up + w_offs, mask=w_mask, other=0.0), up)
        weight = tl.load(top_k_weights_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
        act = gate * tl.sigmoid(gate) * up * weight[:, None]
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, w_ptr, out_ptr, offsets_ptr,
    hidden, inter, w_stride_e, w_stride_n, w_stride_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offsets_ptr + expert)
    w = w_ptr + expert.to(tl.int64) * w_stride_e + cols[None, :].to(tl.int64) * w_stride_n
    for row_start in range(start, end, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        a_rows = act_ptr + rows.to(tl.int64)[:, None] * inter
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, inter, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_ok = ks < inter
            a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w + ks[:, None].to(tl.int64) * w_stride_k, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * hidden + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _block_m(rows: int, num_experts: int) -> int:
    """Rows per block: 1.5× the mean rows per expert rounded up to a power of two, within [16, 128] (`tl.dot`
    needs 16), so that under near-uniform routing nearly every expert fits one block and its weights are read
    once; an expert with more rows loops over blocks and reads its weights once per block."""
    return min(128, max(16, triton.next_power_of_2(triton.cdiv(3 * rows, 2 * num_experts))))


def _decode_experts_forward_launcher(
    hidden_states: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_weights: torch.Tensor,
    order: torch.Tensor,
    position: torch.Tensor,
    offsets: torch.Tensor,
    block: list[int] | None = None,
) -> torch.Tensor:
    """`out[t] = Σ_slots weight · down(silu(gate(x)) ⊙ up(x))` for `hidden_states [T, H]` and the expert-sorted
    slots (`order`, `position`, `offsets` as `sort_by_expert` returns them). `gate_up_proj [E, 2I, H]` and
    `down_proj [E, H, I]` may have any strides. `block` overrides `(BLOCK_N, BLOCK_K, num_warps, num_stages)`
    (for sweeps)."""
    num_tokens, hidden = hidden_states.shape
    num_experts, inter = gate_up_proj.shape[0], down_proj.shape[-1]
    top_k = top_k_weights.shape[-1]
    if hidden_states.stride(1) != 1:
        hidden_states = hidden_states.contiguous()
    block_m = _block_m(order.numel(), num_experts)
    block_n, block_k, num_warps, num_stages = block or (_BLOCK_N, _BLOCK_K, 8 if block_m > 64 else _NUM_WARPS,
                                                        _NUM_STAGES)
    num_rows = order.numel()
    act = hidden_states.new_empty(num_rows, inter)
    _gate_up_swiglu_kernel[(num_experts, triton.cdiv(inter, block_n))](
        hidden_states, order, top_k_weights.contiguous().view(-1), gate_up_proj, act, offsets,
        hidden, inter, hidden_states.stride(0), *gate_up_proj.stride(),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    y = hidden_states.new_empty(num_rows, hidden)
    _down_kernel[(num_experts, triton.cdiv(hidden, block_n))](
        act, down_proj, y, offsets, hidden, inter, *down_proj.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return gather_sum(y, position, offsets, num_tokens)


decode_experts_forward = register_kernel_op(
    "decode_experts_forward", _decode_experts_forward_launcher,
    lambda hidden_states, *_, **__: torch.empty_like(hidden_states, memory_format=torch.contiguous_format),
)
