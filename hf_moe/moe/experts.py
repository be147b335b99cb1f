"""Routed experts: SwiGLU MLPs stored as 3D tensors in transformers' layout.

`gate_up_proj [E, 2·I, H]` (gate rows first, then up) and `down_proj [E, H, I]`, so transformers'
`ExpertsInterface` kernels (`eager`, `batched_mm`, `grouped_mm`, ...) and PEFT's `target_parameters` work on
them unchanged. hf-moe registers its own implementation, `hf_moe_grouped` (the default of hf-moe models), in
the same interface; switch with `model.set_experts_implementation(name)`.

Every implementation has the signature `(experts, hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]` and computes `out[t] = Σ_slots weight · down(act(gate(x)) ⊙ up(x))`.
Slots whose expert index is `num_experts` or more (dropped slots) contribute nothing.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..configuration_hf_moe import HfMoeConfig
from .capacity import SENTINEL_SAFE_IMPLEMENTATIONS
from .kernels import HAS_TRITON as _HAS_TRITON
from .overlap import WeightGradQueue, accumulate_grad


@use_experts_implementation
class HfMoeExperts(nn.Module):
    """The routed experts of one MoE layer (all of them, or this rank's shard under expert parallelism)."""

    def __init__(self, config: HfMoeConfig, num_experts: int | None = None) -> None:
        super().__init__()
        self.num_experts = config.num_experts if num_experts is None else num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Reference ("eager") path: one loop over the experts that received tokens."""
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if expert >= self.num_experts:
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = nn.functional.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


# ---------------------------------------------------------------------------------------------------------------
# Building blocks of `hf_moe_grouped`. Rows are (token, slot) pairs sorted by expert; `offsets[e]` is the end row
# of expert e, so rows from `offsets[-1]` on are dropped slots. On CUDA (bf16) the GEMMs are grouped GEMMs with
# no host sync that leave the rows past `offsets[-1]` unwritten, so every consumer masks them: hf-moe's own Triton
# kernels where they are faster (`_own_gemm`; the gate/up one with SwiGLU in its epilogue), otherwise
# `torch.nn.functional.grouped_mm`; the memory-bound steps are fused Triton kernels. Elsewhere the GEMMs are one
# `mm` per expert (host offsets are free there) that zero the dropped rows, and the other steps are plain torch ops.

_TRITON_KERNELS = None
_GEMM_KERNELS = None
_torch_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _triton_kernels():
    """The Triton kernels module, imported on first use (only ever for CUDA tensors)."""
    global _TRITON_KERNELS
    if _TRITON_KERNELS is None:
        from .kernels import triton_moe

        _TRITON_KERNELS = triton_moe
    return _TRITON_KERNELS


def _gemm_kernels():
    """The Triton grouped-GEMM module, imported on first use (only ever for CUDA tensors)."""
    global _GEMM_KERNELS
    if _GEMM_KERNELS is None:
        from .kernels import grouped_gemm

        _GEMM_KERNELS = grouped_gemm
    return _GEMM_KERNELS


def _use_triton(tensor: torch.Tensor, fused_silu: bool = True) -> bool:
    """Triton kernels serve CUDA tensors; the SwiGLU kernels only the SiLU activation (`fused_silu`)."""
    return fused_silu and _HAS_TRITON and tensor.is_cuda


def _grouped_mm_leaves_tail_unwritten(tensor: torch.Tensor) -> bool:
    """Whether the GEMMs run as torch's grouped GEMM (CUDA bf16: no host sync, dropped rows left unwritten).
    Other dtypes and devices use one `mm` per expert, which reads the offsets on the host."""
    return tensor.is_cuda and tensor.dtype == torch.bfloat16 and _torch_grouped_mm is not None


# When the CUDA GEMMs are hf-moe's own Triton grouped GEMMs (`hf_moe.moe.kernels.grouped_gemm`) instead of torch's:
# at most this many (token, slot) rows per expert on average, and at least this many multiply-adds per GEMM, below
# which the eager step is bound by host launches and a Triton launch costs more host time than torch's. Measured on
# H200s (benchmarks/NOTES.md, "Tenth session: persistent grouped GEMMs"), experts' eager training step: DeepSeek-V3
# shape (7168 x 2048 experts) 1.07-1.16x faster at 32-128 rows per expert and level at 256; Qwen3-30B-A3B shape
# (2048 x 768) 1.02-1.05x at 256-512 rows per expert (>= 2^35 multiply-adds per GEMM) and 0.83-1.10x below,
# depending on the machine's host speed; from 1024 rows per expert torch's GEMMs are as fast or faster at every shape.
_OWN_GEMM_ROWS_PER_EXPERT = 512
_OWN_GEMM_MIN_MULTIPLY_ADDS = 1 << 35


def _own_gemm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the GEMM of `a [S, K]` and `b [E, K, N]` runs as hf-moe's Triton grouped GEMM: CUDA bf16 on Hopper or
    newer, few rows per expert, enough work to keep the GPU busy, and not while torch.compile traces (it traces
    torch's grouped GEMM). Decided on the host from shapes, strides and flags."""
    num_experts, k, n = b.shape
    return (
        _grouped_mm_leaves_tail_unwritten(a)
        and _HAS_TRITON
        and a.shape[0] <= _OWN_GEMM_ROWS_PER_EXPERT * num_experts
        and a.shape[0] * k * n >= _OWN_GEMM_MIN_MULTIPLY_ADDS
        and not torch.compiler.is_compiling()
        and _gemm_kernels().supports(a, b)
    )


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`a [S, K]` sorted by expert, `b [E, K, N]` (any strides) → `[S, N]` with rows of expert e = `a_e @ b[e]`."""
    if _own_gemm(a, b):
        return _gemm_kernels().grouped_mm(a, b, offsets)
    if _grouped_mm_leaves_tail_unwritten(a):
        return _torch_grouped_mm(a, b, offs=offsets)
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(a[start:end], b[expert], out=out[start:end])
        start = end
    out[start:].zero_()
    return out


def _grouped_mm_weight_grad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`a [S, M]`, `b [S, N]` sorted by expert → `[E, M, N]` with `out[e] = a_eᵀ @ b_e` (zero for idle experts)."""
    if _grouped_mm_leaves_tail_unwritten(a):
        return _torch_grouped_mm(a.t(), b, offs=offsets)
    out = a.new_empty(offsets.numel(), a.shape[1], b.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(a[start:end].t(), b[start:end], out=out[expert])
        else:
            out[expert].zero_()
        start = end
    return out


def _gated_act(
    gate_up: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, act_fn: nn.Module, fused_silu: bool
) -> torch.Tensor:
    """`weight · act(gate) ⊙ up` per row; the routing weight is applied here so the combine is a plain sum."""
    if _use_triton(gate_up, fused_silu):
        return _triton_kernels().swiglu_forward(gate_up, weight, offsets)
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate).mul_(up).mul_(weight[:, None].to(gate_up.dtype))


def _gated_act_backward(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
    act_fn: nn.Module,
    fused_silu: bool,
    recompute_out: bool,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of [`_gated_act`] w.r.t. `gate_up` and `weight`, and its recomputed output if asked.
    `in_place` (Triton path only) overwrites `gate_up` and `grad_out` with those results."""
    if _use_triton(gate_up, fused_silu):
        return _triton_kernels().swiglu_backward(gate_up, weight, grad_out, offsets, recompute_out, in_place)
    if not fused_silu:
        with torch.enable_grad():
            gate_up = gate_up.detach().requires_grad_(True)
            weight = weight.detach().to(gate_up.dtype).requires_grad_(True)
            gate, up = gate_up.chunk(2, dim=-1)
            out = act_fn(gate) * up * weight[:, None]
            grad_gate_up, grad_weight = torch.autograd.grad(out, (gate_up, weight), grad_out)
        return grad_gate_up, grad_weight, out.detach() if recompute_out else None
    # SiLU written out so that each [S, I] pass is counted and no temporary is concatenated.
    gate, up = gate_up.chunk(2, dim=-1)
    weight = weight[:, None].to(gate_up.dtype)
    grad_gate_up = torch.empty_like(gate_up)
    grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate)
    torch.mul(grad_out, act, out=grad_up).mul_(weight)
    act.mul_(up)
    grad_weight = torch.linalg.vecdot(grad_out, act)
    torch.mul(grad_out, up, out=grad_gate).mul_(weight)
    torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
    return grad_gate_up, grad_weight, act.mul_(weight) if recompute_out else None


def _gather(
    src: torch.Tensor, token: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`src[token]`: the rows of each (token, slot) pair in expert order (into `out` when given)."""
    if _use_triton(src):
        return _triton_kernels().gather_rows(src, token, offsets, out)
    if out is None:
        return src.index_select(0, token)
    return out.copy_(src.index_select(0, token))


def _combine(src: torch.Tensor, position: torch.Tensor, offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """`out[t] = Σ_j src[position[t·k + j]]` over slots of real experts, summed in a fixed order (deterministic)."""
    if _use_triton(src):
        return _triton_kernels().gather_sum(src, position, offsets, num_tokens)
    rows = src.index_select(0, position)
    if _grouped_mm_leaves_tail_unwritten(src):
        rows.masked_fill_((position >= offsets[-1])[:, None], 0)
    return rows.view(num_tokens, -1, src.shape[-1]).sum(dim=1)


class _RoutedExpertsFunction(torch.autograd.Function):
    """The routed experts as one autograd node. It keeps the gathered inputs `[S, H]`, the gate/up projection
    `[S, 2I]` and the routing indices for backward; the activation is recomputed there (fused into the SwiGLU
    backward kernel) rather than stored.

    On the Triton path (CUDA, SiLU, eager mode) the SwiGLU backward writes the gate/up gradient over the saved
    gate/up projection, which backward no longer needs (and the recomputed activation over its incoming gradient):
    that `[S, 2I]` would otherwise stay allocated until backward returns, next to its gradient and the weight
    gradients (+0.94 GB at peak for Mixtral at T = 8192). The price: a second backward through the same graph
    (`retain_graph=True`) raises instead of running. torch.compile traces the out-of-place version and leaves
    buffer reuse to its own memory planner.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        top_k_weights: torch.Tensor,
        token: torch.Tensor,
        order: torch.Tensor,
        position: torch.Tensor,
        offsets: torch.Tensor,
        act_fn: nn.Module,
        fused_silu: bool,
        weight_grads: WeightGradQueue | None,
    ) -> torch.Tensor:
        x_sorted = _gather(x, token, offsets)
        weight = top_k_weights.reshape(-1).index_select(0, order)
        fuses_swiglu = _use_triton(x_sorted, fused_silu) and gate_up_proj.stride(2) == 1  # the stored layout
        if fuses_swiglu and _own_gemm(x_sorted, gate_up_proj.transpose(1, 2)):
            gate_up, act = _gemm_kernels().gate_up_swiglu(x_sorted, gate_up_proj, weight, offsets)
        else:
            gate_up = _grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offsets)
            act = _gated_act(gate_up, weight, offsets, act_fn, fused_silu)
        y = _grouped_mm(act, down_proj.transpose(1, 2), offsets)
        del act  # [S, I], not saved: free it before the combine allocates its output
        ctx.save_for_backward(x_sorted, gate_up_proj, down_proj, gate_up, weight, token, position, offsets)
        ctx.num_tokens = x.shape[0]
        ctx.gate_up_consumed = False
        ctx.act_fn, ctx.fused_silu, ctx.weights_dtype = act_fn, fused_silu, top_k_weights.dtype
        ctx.weight_grads = weight_grads
        return _combine(y, position, offsets, x.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.gate_up_consumed:
            raise RuntimeError(
                "hf_moe_grouped: on CUDA the experts' backward reuses its saved gate/up projection as the gradient "
                "buffer, so a second backward through the same graph (retain_graph=True) is not supported; run the "
                "forward again instead."
            )
        x_sorted, gate_up_proj, down_proj, gate_up, weight, token, position, offsets = ctx.saved_tensors
        need_x, need_gate_up, need_down, need_weights = ctx.needs_input_grad[:4]
        num_tokens = ctx.num_tokens
        grad_y = _gather(grad_out.to(down_proj.dtype).contiguous(), token, offsets)
        grad_act = _grouped_mm(grad_y, down_proj, offsets)
        in_place = _use_triton(gate_up, ctx.fused_silu) and not torch.compiler.is_compiling()
        grad_gate_up, grad_weight, act = _gated_act_backward(
            gate_up, weight, grad_act, offsets, ctx.act_fn, ctx.fused_silu, recompute_out=need_down, in_place=in_place
        )
        if in_place:  # a second backward would read gradients as the gate/up projection
            ctx.gate_up_consumed = True
        del gate_up, grad_act
        grad_x = grad_gate_up_proj = grad_down_proj = grad_top_k_weights = None
        if need_weights:
            grad_top_k_weights = grad_weight.index_select(0, position)
            if _grouped_mm_leaves_tail_unwritten(grad_weight) and not _use_triton(grad_weight, ctx.fused_silu):
                grad_top_k_weights = grad_top_k_weights.masked_fill(position >= offsets[-1], 0)
            grad_top_k_weights = grad_top_k_weights.view(num_tokens, -1).to(ctx.weights_dtype)
        if _defers_weight_grads(ctx.weight_grads, (gate_up_proj, down_proj), ctx.needs_input_grad[1:3]):
            if need_x:
                grad_x = _combine(_grouped_mm(grad_gate_up, gate_up_proj, offsets), position, offsets, num_tokens)
            for param, a, b in ((down_proj, grad_y, act), (gate_up_proj, grad_gate_up, x_sorted)):
                if param.requires_grad:
                    ctx.weight_grads.defer(partial(_weight_grad_into, param, a, b, offsets))
            return grad_x, None, None, grad_top_k_weights, None, None, None, None, None, None, None
        if need_down:
            grad_down_proj = _grouped_mm_weight_grad(grad_y, act, offsets)
        del grad_y, act
        if need_x:
            grad_x = _combine(_grouped_mm(grad_gate_up, gate_up_proj, offsets), position, offsets, num_tokens)
        if need_gate_up:
            grad_gate_up_proj = _grouped_mm_weight_grad(grad_gate_up, x_sorted, offsets)
        return grad_x, grad_gate_up_proj, grad_down_proj, grad_top_k_weights, None, None, None, None, None, None, None


def _defers_weight_grads(
    weight_grads: WeightGradQueue | None, params: tuple[torch.Tensor, ...], needs_grad: tuple[bool, ...]
) -> bool:
    """Whether the experts' backward hands its weight gradients to `weight_grads` instead of returning them:
    only for leaf parameters (not PEFT's merged weights, whose gradient must flow on through autograd) and never
    while torch.compile traces."""
    return (
        weight_grads is not None
        and any(needs_grad)
        and all(p.is_leaf for p in params)
        and not torch.compiler.is_compiling()
    )


def _weight_grad_into(param: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> None:
    """Deferred weight gradient: `param.grad += [a_eᵀ @ b_e]ₑ`."""
    accumulate_grad(param, _grouped_mm_weight_grad(a, b, offsets))


def sort_by_expert(
    top_k_index: torch.Tensor, num_experts: int, num_slots: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the T·k (token, slot) pairs by expert without a host sync.

    Returns `token [S]` (source token of each sorted row), `order [S]` (flat slot index of each sorted row),
    `position [T·k]` (sorted row of each flat slot: the inverse of `order`) and `offsets [E]` (int32 end row of
    each expert). Slots with index ≥ `num_experts` sort last and lie past `offsets[-1]`. When the caller knows
    the number of real slots (`num_slots`, e.g. under expert parallelism, where most slots belong to other ranks),
    only those rows and one dropped row are kept (S = num_slots + 1) and every dropped slot points at that row.
    """
    flat = top_k_index.reshape(-1)
    # Narrow keys: radix sort passes scale with the key width, and expert ids need few bits.
    key_dtype = torch.int16 if num_experts < torch.iinfo(torch.int16).max else torch.int32
    sorted_expert, order = torch.sort(flat.to(key_dtype), stable=True)
    bounds = torch.arange(1, num_experts + 1, device=flat.device, dtype=sorted_expert.dtype)
    offsets = torch.searchsorted(sorted_expert, bounds, out_int32=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    if num_slots is not None and num_slots < flat.numel():
        order = order[: num_slots + 1]
        position = position.clamp_(max=num_slots)
    token = torch.div(order, top_k_index.shape[-1], rounding_mode="floor")
    return token, order, position, offsets


# Mean (token, slot) rows per expert up to which inference runs the weight-streaming decode kernels
# (`hf_moe.moe.kernels.decode`) instead of the grouped GEMMs: on an H200 they are 1.1-1.7x faster up to 32 rows
# per expert at the Qwen3-30B, Mixtral and DeepSeek-V3 shapes, and slower from 64 (benchmarks/NOTES.md).
_DECODE_ROWS_PER_EXPERT = 32


def _decodes(
    experts: HfMoeExperts, hidden_states: torch.Tensor, top_k_weights: torch.Tensor, num_rows: int, fused_silu: bool
) -> bool:
    """Whether this call takes the decode kernels: CUDA, half-precision SwiGLU experts, nothing that needs a
    gradient, and few rows per expert. Every condition is known on the host from shapes and flags (no sync)."""
    if not (_use_triton(hidden_states, fused_silu) and experts.gate_up_proj.dtype in (torch.bfloat16, torch.float16)):
        return False
    tensors = (hidden_states, top_k_weights, experts.gate_up_proj, experts.down_proj)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return num_rows <= _DECODE_ROWS_PER_EXPERT * experts.num_experts


def grouped_experts_forward(
    self: HfMoeExperts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_slots: int | None = None,
    weight_grads: WeightGradQueue | None = None,
) -> torch.Tensor:
    """hf-moe's experts implementation (`hf_moe_grouped`): sort the (token, slot) pairs by expert, run the gate/up
    and down projections as grouped GEMMs with SwiGLU and the routing weight fused between them, and sum each
    token's k outputs in a fixed order (deterministic, no atomics). No host sync on CUDA. `num_slots`, the number
    of slots with a real expert when the caller knows it, sizes the buffers to those slots (see `sort_by_expert`).
    With `weight_grads`, backward defers the expert weights' gradients to that queue (see `hf_moe.moe.overlap`).
    Inference with few rows per expert (decode; CUDA, half precision, SiLU, no gradient needed) runs two
    weight-streaming kernels instead of the grouped GEMMs (see `hf_moe.moe.kernels.decode`).
    """
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)
    token, order, position, offsets = sort_by_expert(top_k_index, self.num_experts, num_slots)
    fused_silu = self.config.hidden_act in ("silu", "swish")
    if _decodes(self, hidden_states, top_k_weights, order.numel(), fused_silu):
        from .kernels.decode import decode_experts_forward

        x = hidden_states.to(self.gate_up_proj.dtype)
        out = decode_experts_forward(x, self.gate_up_proj, self.down_proj, top_k_weights, order, position, offsets)
        return out.to(hidden_states.dtype)
    out = _RoutedExpertsFunction.apply(
        hidden_states.to(self.gate_up_proj.dtype),
        self.gate_up_proj,
        self.down_proj,
        top_k_weights,
        token,
        order,
        position,
        offsets,
        self.act_fn,
        fused_silu,
        weight_grads,
    )
    return out.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register("hf_moe_grouped", grouped_experts_forward)


def base_layer(module: nn.Module) -> nn.Module:
    """The hf-moe module under a PEFT wrapper (`target_parameters` LoRA wraps the experts and the router)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def run_routed_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_slots: int | None = None,
    weight_grads: WeightGradQueue | None = None,
) -> torch.Tensor:
    """Run `experts` (possibly wrapped by PEFT) on routing whose slots may be sentinels (index ≥ num_experts):
    dropped by a capacity, or owned by another rank under expert parallelism.

    Implementations that skip sentinels themselves get the routing as is (`hf_moe_grouped` also gets `num_slots`,
    the number of real slots when the caller knows it, and `weight_grads`, a queue its backward may defer the
    weight gradients to). For the others only the real (token, expert) slots are gathered (one host sync), run
    as top-1 slots and summed back per token.
    """
    base = base_layer(experts)
    implementation = base.config._experts_implementation
    if implementation == "hf_moe_grouped" and (num_slots is not None or weight_grads is not None):
        return experts(hidden_states, top_k_index, top_k_weights, num_slots=num_slots, weight_grads=weight_grads)
    if implementation in SENTINEL_SAFE_IMPLEMENTATIONS:
        return experts(hidden_states, top_k_index, top_k_weights)
    token_idx, slot = torch.nonzero(top_k_index < base.num_experts, as_tuple=True)
    y = experts(hidden_states[token_idx], top_k_index[token_idx, slot, None], top_k_weights[token_idx, slot, None])
    return torch.zeros_like(hidden_states).index_add_(0, token_idx, y.to(hidden_states.dtype))
