"""Grouped GEMMs over rows sorted by expert, in Triton with TMA loads (Hopper and newer), and the gate/up GEMM with
SwiGLU and the routing weight in its epilogue.

torch's grouped GEMM runs one tile configuration for every shape. With few rows per expert these kernels take less
GPU time, and the gate/up GEMM with SwiGLU fused in saves the activation kernel's read of the `[S, 2I]` projection;
with many rows per expert torch's are as fast or faster, and a launch costs more host time than torch's, which
small GEMMs do not earn back in eager mode. So `hf_moe_grouped` takes these only where its plan says so
(`hf_moe.moe.experts.plan`); the weight-gradient GEMMs are torch's or quack's (`quack_gemm`). Measurements and the rule:
docs/decisions/own-grouped-gemms.md.

Tiling: each expert's rows are cut into BLOCK_M-row tiles, numbered over all experts in order; work item w is tile
w // num_col_blocks, column block w % num_col_blocks. The kernels are persistent: one program per SM builds the
experts' tile table once from the device offsets (a prefix sum of the experts' tile counts) and walks the work items
in a strided loop, which Triton pipelines across tiles so one tile's epilogue overlaps the next tile's first loads.
Nothing synchronises with the host, so the launch can be captured in a CUDA graph. A tile's rows past its expert's
end are loaded (they belong to the next expert, or are zeros past the tensor) and never stored; the weights are read
through 3-D descriptors, so a tile never reads another expert's weights. Rows past `offsets[-1]` (dropped slots) are
left unwritten, as by torch's grouped GEMM.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .library import register_kernel_op
from .swiglu import swiglu_forward

_torch_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

# Tiles chosen on an H200 at the Qwen3-30B-A3B, DeepSeek-V3 and Mixtral shapes (docs/decisions/own-grouped-gemms.md).
_BLOCK_M, _BLOCK_N, _BLOCK_K, _NUM_WARPS, _NUM_STAGES = 128, 256, 64, 8, 3
# The fused gate/up kernel's tile: BLOCK_M rows × _SWIGLU_BLOCK_N activation columns.
_SWIGLU_BLOCK_N = 128
ONE_ACCUMULATOR_MAX_K = 4096
"""With up to this many inputs the fused gate/up kernel keeps the gate's and the up projection's columns in one
accumulator `[BLOCK_M, 2 · _SWIGLU_BLOCK_N]` (one load of both weight row blocks, one more pipeline stage, the tile
loop pipelined too); with more (DeepSeek-V3's 7168, where reading the weights bounds the kernel) two accumulators
ran faster. docs/decisions/own-grouped-gemms.md §5."""
# Software-pipeline the loop over a program's tiles together with the K loop, so the next tile's first loads are
# issued during this tile's epilogue (in the gate/up kernel only with one accumulator: with two it ran slower).
_FLATTEN = True


@triton.jit
def _tile_table(offsets_ptr, num_experts, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per expert: first row, end row, number of BLOCK_M-row tiles, and the running total of tiles."""
    experts = tl.arange(0, BLOCK_E)
    real = experts < num_experts
    ends = tl.load(offsets_ptr + experts, mask=real, other=0)
    starts = tl.load(offsets_ptr + experts - 1, mask=real & (experts > 0), other=0)
    tiles = tl.where(real, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    return starts, ends, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _locate_work(
    work, num_col_blocks, starts, ends, tiles, cum_tiles,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """(expert, first row, end row of that expert, first column) of work item `work`."""
    tile = work // num_col_blocks
    experts = tl.arange(0, BLOCK_E)
    expert = tl.sum((cum_tiles <= tile).to(tl.int32))
    first_tile = tl.sum(tl.where(experts < expert, tiles, 0))
    row_start = tl.sum(tl.where(experts == expert, starts, 0))
    row_end = tl.sum(tl.where(experts == expert, ends, 0))
    return expert, row_start + (tile - first_tile) * BLOCK_M, row_end, (work % num_col_blocks) * BLOCK_N


@triton.jit
def _grouped_mm_kernel(
    a_desc, b_desc, out_ptr, offsets_ptr, num_experts, N, K, out_stride,
    B_K_MAJOR: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLATTEN: tl.constexpr,
):
    starts, ends, tiles, cum_tiles = _tile_table(offsets_ptr, num_experts, BLOCK_E, BLOCK_M)
    num_col_blocks = tl.cdiv(N, BLOCK_N)
    num_work = tl.sum(tiles) * num_col_blocks
    for work in tl.range(tl.program_id(0), num_work, tl.num_programs(0), flatten=FLATTEN):
        expert, row0, row_end, col0 = _locate_work(
            work, num_col_blocks, starts, ends, tiles, cum_tiles, BLOCK_E, BLOCK_M, BLOCK_N
        )
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
    ONE_ACC: tl.constexpr,
):
    starts, ends, tiles, cum_tiles = _tile_table(offsets_ptr, num_experts, BLOCK_E, BLOCK_M)
    num_col_blocks = tl.cdiv(inter, BLOCK_N)
    num_work = tl.sum(tiles) * num_col_blocks
    dtype = gate_up_ptr.dtype.element_ty
    for work in tl.range(tl.program_id(0), num_work, tl.num_programs(0), flatten=ONE_ACC):
        expert, row0, row_end, col0 = _locate_work(
            work, num_col_blocks, starts, ends, tiles, cum_tiles, BLOCK_E, BLOCK_M, BLOCK_N
        )
        # The weight is read as [E, 2, I, H]: index 0 the gate's rows, 1 the up projection's. Each is rounded to the
        # stored dtype first: the activation is then the one backward recomputes from the saved gate/up.
        if ONE_ACC:  # columns [0, BLOCK_N) of the accumulator the gate's, [BLOCK_N, 2·BLOCK_N) the up projection's
            acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                w = w_desc.load([expert, 0, col0, k]).reshape(2 * BLOCK_N, BLOCK_K)
                acc = tl.dot(x_desc.load([row0, k]), w.T, acc)
            gate, up = tl.split(tl.permute(acc.to(dtype).reshape(BLOCK_M, 2, BLOCK_N), (0, 2, 1)))
        else:
            gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k in range(0, K, BLOCK_K):
                x = x_desc.load([row0, k])
                gate = tl.dot(x, w_desc.load([expert, 0, col0, k]).reshape(BLOCK_N, BLOCK_K).T, gate)
                up = tl.dot(x, w_desc.load([expert, 1, col0, k]).reshape(BLOCK_N, BLOCK_K).T, up)
            gate, up = gate.to(dtype), up.to(dtype)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = col0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        mask = row_ok[:, None] & (cols < inter)[None, :]
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


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid(device: torch.device, num_rows: int, num_experts: int, num_col_blocks: int) -> tuple[int]:
    """One program per SM, or fewer when even the worst-case tile count (every expert's last tile partial) is
    smaller; the programs walk the tiles in a strided loop."""
    worst_case = (triton.cdiv(num_rows, _BLOCK_M) + num_experts) * num_col_blocks
    return (min(_num_sms(device.index), worst_case),)


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


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`a [S, K]` sorted by expert, `b [E, K, N]` → `[S, N]` with rows of expert e = `a_e @ b[e]`; rows past
    `offsets[-1]` are left unwritten. `b` is either K-major (`W.transpose(1, 2)` of a stored `[E, N, K]` weight)
    or row-major. Where `supports(a, b)` is false (decided here, on the real tensors: alignment is a property of
    the pointers, which the compiler's fake tensors do not have) it runs torch's grouped GEMM instead."""
    if not supports(a, b):
        return _torch_grouped_mm(a, b, offs=offsets)
    num_rows, K = a.shape
    num_experts, _, N = b.shape
    out = a.new_empty(num_rows, N)
    a_desc = TensorDescriptor(a, [num_rows, K], [a.stride(0), 1], [_BLOCK_M, _BLOCK_K])
    k_major = b.stride(1) == 1
    if k_major:
        b_desc = _weight_descriptor(b.transpose(1, 2), [1, _BLOCK_N, _BLOCK_K])
    else:
        b_desc = _weight_descriptor(b, [1, _BLOCK_K, _BLOCK_N])
    _grouped_mm_kernel[_grid(a.device, num_rows, num_experts, triton.cdiv(N, _BLOCK_N))](
        a_desc, b_desc, out, offsets, num_experts, N, K, out.stride(0),
        B_K_MAJOR=k_major, BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K, FLATTEN=_FLATTEN, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return out


grouped_mm = register_kernel_op(
    "grouped_mm", _grouped_mm, lambda a, b, offsets: a.new_empty(a.shape[0], b.shape[-1])
)


def _gate_up_swiglu(
    x: torch.Tensor, gate_up_proj: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [S, H]` sorted by expert, `gate_up_proj [E, 2I, H]` → the projection `gate_up [S, 2I]` (saved for
    backward) and the activation `weight · silu(gate) ⊙ up [S, I]`, from one kernel; where
    `supports(x, gate_up_proj.transpose(1, 2))` is false, from torch's grouped GEMM and the SwiGLU kernel."""
    if not supports(x, gate_up_proj.transpose(1, 2)):
        gate_up = _torch_grouped_mm(x, gate_up_proj.transpose(1, 2), offs=offsets)
        return gate_up, swiglu_forward(gate_up, weight, offsets)
    num_rows, K = x.shape
    num_experts, two_inter, _ = gate_up_proj.shape
    inter = two_inter // 2
    gate_up = x.new_empty(num_rows, two_inter)
    act = x.new_empty(num_rows, inter)
    x_desc = TensorDescriptor(x, [num_rows, K], [x.stride(0), 1], [_BLOCK_M, _BLOCK_K])
    one_acc = K <= ONE_ACCUMULATOR_MAX_K
    w_desc = _weight_descriptor(gate_up_proj.unflatten(1, (2, inter)), [1, 1 + one_acc, _SWIGLU_BLOCK_N, _BLOCK_K])
    _gate_up_swiglu_kernel[_grid(x.device, num_rows, num_experts, triton.cdiv(inter, _SWIGLU_BLOCK_N))](
        x_desc, w_desc, gate_up, act, weight, offsets, num_experts, inter, K,
        BLOCK_E=triton.next_power_of_2(num_experts), BLOCK_M=_BLOCK_M, BLOCK_N=_SWIGLU_BLOCK_N, BLOCK_K=_BLOCK_K,
        ONE_ACC=one_acc, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES + one_acc,
    )
    return gate_up, act


def _gate_up_swiglu_fake(x, gate_up_proj, weight, offsets):
    two_inter = gate_up_proj.shape[1]
    return x.new_empty(x.shape[0], two_inter), x.new_empty(x.shape[0], two_inter // 2)


gate_up_swiglu = register_kernel_op("gate_up_swiglu", _gate_up_swiglu, _gate_up_swiglu_fake)
