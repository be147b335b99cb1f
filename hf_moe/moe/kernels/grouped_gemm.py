"""Grouped GEMMs over rows sorted by expert, in Triton with TMA loads (Hopper and newer), and the gate/up GEMM with
SwiGLU and the routing weight in its epilogue.

torch's grouped GEMM runs one tile configuration for every shape. With few rows per expert these kernels take less
GPU time on an H200 (`benchmarks/grouped_gemms.py`): 1.05-1.28x per GEMM at 64-128 rows per expert (DeepSeek-V3,
Qwen3-30B-A3B at T = 2048), 1.00-1.05x at 512, and the gate/up GEMM with SwiGLU fused in saves the activation
kernel's read of the `[S, 2I]` projection. From 1024 rows per expert torch's is as fast or faster (Mixtral at
T = 8192: 0.74-1.02x). A launch costs more host time than torch's, which small experts do not earn back in eager
mode, so `hf_moe_grouped` takes these for few rows per expert and large experts only (`_own_gemm` in
`hf_moe.moe.experts`; benchmarks/NOTES.md, "Eighth session: own grouped GEMMs"). The weight-gradient GEMMs stay
torch's: Triton versions ran at 0.5-1.15x.

Tiling: each expert's rows are cut into BLOCK_M-row tiles, numbered over all experts in order; program p computes
tile p // num_col_blocks, column block p % num_col_blocks. The grid is sized on the host for the worst case
(ceil(S / BLOCK_M) + E tiles) and every program finds its expert from the device offsets (a prefix sum of the
experts' tile counts), so nothing synchronises with the host and the launch can be captured in a CUDA graph;
programs past the last tile return at once. A tile's rows past its expert's end are loaded (they belong to the next
expert, or are zeros past the tensor) and never stored; the weights are read through 3-D descriptors, so a tile
never reads another expert's weights. Rows past `offsets[-1]` (dropped slots) are left unwritten, as by torch's
grouped GEMM.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# Tiles chosen on an H200 at the Qwen3-30B-A3B, DeepSeek-V3 and Mixtral shapes (benchmarks/NOTES.md).
_BLOCK_M, _BLOCK_N, _BLOCK_K, _NUM_WARPS, _NUM_STAGES = 128, 256, 64, 8, 3
# The fused gate/up kernel keeps two accumulators (gate and up), so each covers half the columns.
_SWIGLU_BLOCK_N = 128


@triton.jit
def _expert_tile(offsets_ptr, tile, num_experts, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """(number of tiles, expert of `tile`, first row of `tile`, end row of that expert)."""
    experts = tl.arange(0, BLOCK_E)
    real = experts < num_experts
    ends = tl.load(offsets_ptr + experts, mask=real, other=0)
    starts = tl.load(offsets_ptr + experts - 1, mask=real & (experts > 0), other=0)
    tiles = tl.where(real, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    expert = tl.sum((tl.cumsum(tiles, 0) <= tile).to(tl.int32))
    first_tile = tl.sum(tl.where(experts < expert, tiles, 0))
    row_start = tl.sum(tl.where(experts == expert, starts, 0))
    row_end = tl.sum(tl.where(experts == expert, ends, 0))
    return tl.sum(tiles), expert, row_start + (tile - first_tile) * BLOCK_M, row_end


@triton.jit
def _grouped_mm_kernel(
    a_desc, b_desc, out_ptr, offsets_ptr, num_experts, N, K, out_stride,
    B_K_MAJOR: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_col_blocks = tl.cdiv(N, BLOCK_N)
    tile = pid // num_col_blocks
    num_tiles, expert, row0, row_end = _expert_tile(offsets_ptr, tile, num_experts, BLOCK_E, BLOCK_M)
    if tile >= num_tiles:
        return
    col0 = (pid % num_col_blocks) * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([row0, k])
        if B_K_MAJOR:  # b[e] = W[e]ᵀ with W[e] [N, K] row-major (the stored layout of the expert weights)
            b = b_desc.load([expert, col0, k]).reshape(BLOCK_N, BLOCK_K).T
        else:
            b = b_desc.load([expert, k, col0]).reshape(BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_stride + cols[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < row_end)[:, None] & (cols < N)[None, :])


@triton.jit
def _gate_up_swiglu_kernel(
    x_desc, w_desc, gate_up_ptr, act_ptr, weight_ptr, offsets_ptr, num_experts, inter, K,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_col_blocks = tl.cdiv(inter, BLOCK_N)
    tile = pid // num_col_blocks
    num_tiles, expert, row0, row_end = _expert_tile(offsets_ptr, tile, num_experts, BLOCK_E, BLOCK_M)
    if tile >= num_tiles:
        return
    col0 = (pid % num_col_blocks) * BLOCK_N
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        x = x_desc.load([row0, k])
        gate = tl.dot(x, w_desc.load([expert, col0, k]).reshape(BLOCK_N, BLOCK_K).T, gate)
        up = tl.dot(x, w_desc.load([expert, inter + col0, k]).reshape(BLOCK_N, BLOCK_K).T, up)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    mask = row_ok[:, None] & (cols < inter)[None, :]
    # Round to the stored dtype first: the activation is then the one backward recomputes from the saved gate/up.
    gate = gate.to(gate_up_ptr.dtype.element_ty)
    up = up.to(gate_up_ptr.dtype.element_ty)
    gate_up_ptrs = gate_up_ptr + rows.to(tl.int64)[:, None] * (2 * inter) + cols[None, :]
    tl.store(gate_up_ptrs, gate, mask=mask)
    tl.store(gate_up_ptrs + inter, up, mask=mask)
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    act = g * tl.sigmoid(g) * up.to(tl.float32) * weight[:, None]
    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * inter + cols[None, :]
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=mask)


def _aligned(t: torch.Tensor, contiguous_dim: int) -> bool:
    """TMA's requirements: 16-byte aligned base and strides, unit stride along `contiguous_dim`."""
    size = t.element_size()
    strides = [s for d, s in enumerate(t.stride()) if d != contiguous_dim]
    return t.stride(contiguous_dim) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in strides)


@functools.cache
def _has_tma(device_index: int) -> bool:
    """Compute capability 9+ (cached: the query costs ~15 µs of host time, as much as a launch)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def supports(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `grouped_mm(a, b, offsets)` can run here: CUDA with TMA (compute capability 9+), 16-bit operands of
    one dtype, `a` row-major and `b [E, K, N]` K-major or row-major, all 16-byte aligned."""
    if not (a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype and a.dim() == 2):
        return False
    if a.shape[0] == 0 or not _has_tma(a.device.index):
        return False
    return _aligned(a, 1) and (_aligned(b, 1) or _aligned(b, 2))


def _weight_descriptor(w: torch.Tensor, block: list[int]) -> TensorDescriptor:
    return TensorDescriptor(w, list(w.shape), list(w.stride()), block)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`a [S, K]` sorted by expert, `b [E, K, N]` → `[S, N]` with rows of expert e = `a_e @ b[e]`; rows past
    `offsets[-1]` are left unwritten. `b` is either K-major (`W.transpose(1, 2)` of a stored `[E, N, K]` weight)
    or row-major; see `supports`."""
    num_rows, K = a.shape
    num_experts, _, N = b.shape
    out = a.new_empty(num_rows, N)
    a_desc = TensorDescriptor(a, [num_rows, K], [a.stride(0), 1], [_BLOCK_M, _BLOCK_K])
    k_major = b.stride(1) == 1
    if k_major:
        b_desc = _weight_descriptor(b.transpose(1, 2), [1, _BLOCK_N, _BLOCK_K])
    else:
        b_desc = _weight_descriptor(b, [1, _BLOCK_K, _BLOCK_N])
    grid = ((triton.cdiv(num_rows, _BLOCK_M) + num_experts) * triton.cdiv(N, _BLOCK_N),)
    _grouped_mm_kernel[grid](
        a_desc, b_desc, out, offsets, num_experts, N, K, out.stride(0),
        B_K_MAJOR=k_major, BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return out


def gate_up_swiglu(
    x: torch.Tensor, gate_up_proj: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [S, H]` sorted by expert, `gate_up_proj [E, 2I, H]` → the projection `gate_up [S, 2I]` (saved for
    backward) and the activation `weight · silu(gate) ⊙ up [S, I]`, from one kernel. Requires
    `supports(x, gate_up_proj.transpose(1, 2))`."""
    num_rows, K = x.shape
    num_experts, two_inter, _ = gate_up_proj.shape
    inter = two_inter // 2
    gate_up = x.new_empty(num_rows, two_inter)
    act = x.new_empty(num_rows, inter)
    x_desc = TensorDescriptor(x, [num_rows, K], [x.stride(0), 1], [_BLOCK_M, _BLOCK_K])
    w_desc = _weight_descriptor(gate_up_proj, [1, _SWIGLU_BLOCK_N, _BLOCK_K])
    grid = ((triton.cdiv(num_rows, _BLOCK_M) + num_experts) * triton.cdiv(inter, _SWIGLU_BLOCK_N),)
    _gate_up_swiglu_kernel[grid](
        x_desc, w_desc, gate_up, act, weight, offsets, num_experts, inter, K,
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_M=_BLOCK_M, BLOCK_N=_SWIGLU_BLOCK_N, BLOCK_K=_BLOCK_K,
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return gate_up, act
