"""hf-moe's experts implementation, `hf_moe_grouped` (the default of hf-moe models).

Rows are (token, slot) pairs sorted by expert; `offsets[e]` is the end row of expert e, so rows from `offsets[-1]`
on are dropped slots. The kernels of a call come from its plan (`hf_moe.moe.experts.plan`): on CUDA (bf16) the
GEMMs are grouped GEMMs with no host sync that leave the rows past `offsets[-1]` unwritten, so every consumer masks
them, and the memory-bound steps are fused Triton kernels; elsewhere the GEMMs are one `mm` per expert (host
offsets are free there) that zero the dropped rows, and the other steps are plain torch ops.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .. import kernels
from ..ops import gather_rows, gather_sum, triton_serves
from .module import input_projection
from .per_expert import per_expert_mm, per_expert_weight_grad
from .plan import ExpertsPlan, Gemm, WeightGradGemm, WeightGrads, plan_experts

_torch_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, gemm: Gemm) -> torch.Tensor:
    """`a [S, K]` sorted by expert, `b [E, K, N]` (any strides) → `[S, N]` with rows of expert e = `a_e @ b[e]`."""
    if gemm == "triton":  # torch's where the Triton kernel does not support the operands
        return kernels.grouped_gemm.grouped_mm(a, b, offsets)
    if gemm != "per_expert":
        return _torch_grouped_mm(a, b, offs=offsets)
    return per_expert_mm(a, b, offsets)


def _grouped_mm_weight_grad(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, gemm: WeightGradGemm
                            ) -> torch.Tensor:
    """`a [S, M]`, `b [S, N]` sorted by expert → `[E, M, N]` with `out[e] = a_eᵀ @ b_e` (zero for idle experts)."""
    if gemm == "quack":
        return kernels.quack_gemm.weight_grad(a, b, offsets)
    if gemm == "grouped_mm":
        return _torch_grouped_mm(a.t(), b, offs=offsets)
    return per_expert_weight_grad(a, b, offsets)


def _activation(projected: torch.Tensor, act_fn: nn.Module, gated: bool) -> torch.Tensor:
    """`act(gate) ⊙ up` of a gated projection `[S, 2I]`, `act(up)` of a non-gated one `[S, I]`."""
    if not gated:
        return act_fn(projected)
    gate, up = projected.chunk(2, dim=-1)
    return act_fn(gate) * up


def _gated_act(
    gate_up: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, act_fn: nn.Module, triton: bool,
    gated: bool = True,
) -> torch.Tensor:
    """`weight · act(gate) ⊙ up` (or `weight · act(up)`, non-gated) per row; the routing weight is applied here so
    the combine is a plain sum."""
    if triton:
        return kernels.swiglu.swiglu_forward(gate_up, weight, offsets)
    weight = weight[:, None]
    weight = weight if weight.dtype == gate_up.dtype else weight.to(gate_up.dtype)
    # act(up) may be `up` itself (an identity activation): scale out of place
    return act_fn(gate_up) * weight if not gated else _activation(gate_up, act_fn, gated).mul_(weight)


def _gated_act_backward(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
    act_fn: nn.Module,
    fused_silu: bool,
    recompute_out: bool,
    triton: bool = False,
    in_place: bool = False,
    traced: bool = False,
    gated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of [`_gated_act`] w.r.t. `gate_up` and `weight`, and its recomputed output if asked. `fused_silu`:
    the activation is SiLU of gated experts (written out below); `in_place` (Triton only) overwrites `gate_up` and
    `grad_out` with those results; `traced` (torch.compile) computes it out of place."""
    if triton:
        return kernels.swiglu.swiglu_backward(gate_up, weight, grad_out, offsets, recompute_out, in_place)
    if not fused_silu:
        with torch.enable_grad():
            gate_up = gate_up.detach().requires_grad_(True)
            weight = weight.detach().to(gate_up.dtype).requires_grad_(True)
            out = _activation(gate_up, act_fn, gated) * weight[:, None]
            grad_gate_up, grad_weight = torch.autograd.grad(out, (gate_up, weight), grad_out)
        return grad_gate_up, grad_weight, out.detach() if recompute_out else None
    # SiLU written out so that each [S, I] pass is counted and no temporary is concatenated.
    gate, up = gate_up.chunk(2, dim=-1)
    weight = weight[:, None].to(gate_up.dtype)
    if traced:  # out= into column halves does not trace; the compiler plans the buffers itself
        act = torch.nn.functional.silu(gate)
        grad_up = grad_out * act * weight
        act = act * up
        grad_gate = torch.ops.aten.silu_backward(grad_out * up * weight, gate)
        out = act * weight if recompute_out else None
        return torch.cat([grad_gate, grad_up], dim=-1), torch.linalg.vecdot(grad_out, act), out
    grad_gate_up = torch.empty_like(gate_up)
    grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate)
    torch.mul(grad_out, act, out=grad_up).mul_(weight)
    act.mul_(up)
    grad_weight = torch.linalg.vecdot(grad_out, act)
    torch.mul(grad_out, up, out=grad_gate).mul_(weight)
    torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
    return grad_gate_up, grad_weight, act.mul_(weight) if recompute_out else None


def _accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """`param.grad += grad` (or `= grad` when there is none yet), as autograd accumulates into a leaf."""
    with torch.no_grad():
        if param.grad is None:
            param.grad = grad.contiguous()
        else:
            param.grad.add_(grad)


def _weight_grad_into(param: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
                      gemm: WeightGradGemm):
    """Deferred weight gradient: `param.grad += [a_eᵀ @ b_e]ₑ`."""
    _accumulate_grad(param, _grouped_mm_weight_grad(a, b, offsets, gemm))


def _weight_grad(param: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, plan: ExpertsPlan,
                 weight_grads: WeightGrads | None) -> torch.Tensor | None:
    """`param`'s gradient `[a_eᵀ @ b_e]ₑ` to return, or None once handed to `weight_grads` (deferred)."""
    if plan.defer_weight_grads:
        weight_grads.defer(partial(_weight_grad_into, param, a, b, offsets, plan.weight_grad_gemm))
        return None
    return _grouped_mm_weight_grad(a, b, offsets, plan.weight_grad_gemm)


def _gate_up_forward(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    weight: torch.Tensor,
    token: torch.Tensor,
    offsets: torch.Tensor,
    act_fn: nn.Module,
    plan: ExpertsPlan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate/up step: `(x_sorted [S, H], gate_up [S, 2I], act [S, I])` (see [`_GateUpFunction`])."""
    x_sorted = gather_rows(x, token, offsets, triton=plan.triton_rows)
    if plan.fused_gate_up_swiglu:  # unfused where the Triton kernel does not support the operands
        gate_up, act = kernels.grouped_gemm.gate_up_swiglu(x_sorted, gate_up_proj, weight, offsets)
    else:
        gate_up = _grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offsets, plan.gate_up_gemm)
        act = _gated_act(gate_up, weight, offsets, act_fn, plan.triton_swiglu, plan.gated)
    return x_sorted, gate_up, act


def _down_forward(
    act: torch.Tensor, down_proj: torch.Tensor, by_token: torch.Tensor, offsets: torch.Tensor, plan: ExpertsPlan
) -> torch.Tensor:
    """The down step and the combine: `[T, H]` (see [`_DownFunction`])."""
    y = _grouped_mm(act, down_proj.transpose(1, 2), offsets, plan.down_gemm)
    return gather_sum(y, by_token, offsets, triton=plan.triton_rows)


# The routed experts are two autograd nodes, split at the gate/up projection, so that under gradient accumulation
# autograd adds the down projection's weight gradient into `.grad` (and frees it) before the gate/up node's backward
# allocates the gate/up projection's: one expert weight gradient is alive at a time, never both (the
# expert-weight-sized peak of backward). Rule and measurements: docs/decisions/experts-kernels.md.


class _GateUpFunction(torch.autograd.Function):
    """Gather the sorted rows' tokens and project them: returns the gate/up projection `gate_up [S, 2I]` and, as a
    non-differentiable by-product, `act [S, I]` = routing weight · SwiGLU(gate_up) (the fused kernel computes it in
    the GEMM's epilogue; `_DownFunction`'s backward differentiates through it). Keeps the gathered inputs `[S, H]`."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        gate_up_proj: torch.Tensor,
        weight: torch.Tensor,
        token: torch.Tensor,
        by_token: torch.Tensor,
        offsets: torch.Tensor,
        act_fn: nn.Module,
        plan: ExpertsPlan,
        weight_grads: WeightGrads | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x_sorted, gate_up, act = _gate_up_forward(x, gate_up_proj, weight, token, offsets, act_fn, plan)
        ctx.mark_non_differentiable(act)
        ctx.set_materialize_grads(False)  # no zero gradient for `act`: nothing reads it
        ctx.save_for_backward(x_sorted, gate_up_proj, by_token, offsets)
        ctx.plan, ctx.weight_grads = plan, weight_grads
        return gate_up, act

    @staticmethod
    def backward(ctx, grad_gate_up: torch.Tensor, _grad_act: None):
        x_sorted, gate_up_proj, by_token, offsets = ctx.saved_tensors
        need_x, need_gate_up_proj = ctx.needs_input_grad[:2]
        plan: ExpertsPlan = ctx.plan
        grad_x = grad_gate_up_proj = None
        if need_x:
            grad_x = gather_sum(_grouped_mm(grad_gate_up, gate_up_proj, offsets, plan.gate_up_gemm), by_token,
                                offsets, triton=plan.triton_rows)
        if need_gate_up_proj:
            grad_gate_up_proj = _weight_grad(gate_up_proj, grad_gate_up, x_sorted, offsets, plan, ctx.weight_grads)
        return grad_x, grad_gate_up_proj, None, None, None, None, None, None, None


class _DownFunction(torch.autograd.Function):
    """Project `act` down and sum each token's k rows (combine). Differentiated w.r.t. `gate_up` through SwiGLU and
    the routing weight: `act` comes from `_GateUpFunction` and is not kept; backward recomputes it, fused into the
    SwiGLU backward kernel. `weight` holds `top_k_weights`' values in row order; `top_k_weights` is an input so
    that its gradient flows.

    With `plan.in_place_backward` (CUDA, SiLU, eager mode) the SwiGLU backward writes the gate/up gradient over the
    saved gate/up projection, which nothing needs afterwards (and the recomputed activation over its incoming
    gradient): that `[S, 2I]` would otherwise stay allocated next to its gradient and the down projection's weight
    gradient. The price: a second backward through the same graph (`retain_graph=True`) raises instead of running.
    torch.compile traces the out-of-place version and leaves buffer reuse to its own memory planner.
    """

    @staticmethod
    def forward(
        ctx,
        gate_up: torch.Tensor,
        act: torch.Tensor,
        top_k_weights: torch.Tensor,
        down_proj: torch.Tensor,
        weight: torch.Tensor,
        token: torch.Tensor,
        by_token: torch.Tensor,
        offsets: torch.Tensor,
        act_fn: nn.Module,
        fused_silu: bool,
        plan: ExpertsPlan,
        weight_grads: WeightGrads | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(gate_up, down_proj, weight, token, by_token, offsets)
        ctx.gate_up_consumed = False
        ctx.act_fn, ctx.fused_silu, ctx.weights_dtype = act_fn, fused_silu, top_k_weights.dtype
        ctx.plan, ctx.weight_grads = plan, weight_grads
        return _down_forward(act, down_proj, by_token, offsets, plan)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.gate_up_consumed:
            raise RuntimeError(
                "hf_moe_grouped: on CUDA the experts' backward reuses its saved gate/up projection as the gradient "
                "buffer, so a second backward through the same graph (retain_graph=True) is not supported; run the "
                "forward again instead."
            )
        gate_up, down_proj, weight, token, by_token, offsets = ctx.saved_tensors
        need_weights, need_down = ctx.needs_input_grad[2:4]
        plan: ExpertsPlan = ctx.plan
        grad_y = gather_rows(grad_out.to(down_proj.dtype).contiguous(), token, offsets, triton=plan.triton_rows)
        grad_act = _grouped_mm(grad_y, down_proj, offsets, plan.down_gemm)
        grad_gate_up, grad_weight, act = _gated_act_backward(
            gate_up, weight, grad_act, offsets, ctx.act_fn, ctx.fused_silu, recompute_out=need_down,
            triton=plan.triton_swiglu, in_place=plan.in_place_backward, traced=plan.traced, gated=plan.gated,
        )
        if plan.in_place_backward:  # a second backward would read gradients as the gate/up projection
            ctx.gate_up_consumed = True
        del gate_up, grad_act
        grad_top_k_weights = grad_down_proj = None
        if need_weights:
            position = by_token.reshape(-1)
            grad_top_k_weights = grad_weight.index_select(0, position)
            if plan.tail_unwritten and not plan.triton_swiglu:
                grad_top_k_weights = grad_top_k_weights.masked_fill(position >= offsets[-1], 0)
            grad_top_k_weights = grad_top_k_weights.view(by_token.shape).to(ctx.weights_dtype)
        if need_down:
            grad_down_proj = _weight_grad(down_proj, grad_y, act, offsets, plan, ctx.weight_grads)
        return grad_gate_up, None, grad_top_k_weights, grad_down_proj, None, None, None, None, None, None, None, None


# The Triton sorts (`hf_moe.moe.kernels.sort_by_expert`) replace torch's sort with at most this many experts and
# (token, slot) pairs: one launch that compares every pair with every pair and expert up to
# TRITON_SORT_ONE_LAUNCH_MAX_PAIRS (one wave of at most 8 programs), a counting sort in two launches above; torch's
# sort costs a dozen launches and its host ops at any size. Past the pair limit the counting sort's table (blocks ×
# experts, read by every program) outgrows its use and torch's sort runs. Rule: docs/decisions/sort-by-expert.md.
TRITON_SORT_MAX_EXPERTS = 1024
TRITON_SORT_ONE_LAUNCH_MAX_PAIRS = 1024
TRITON_SORT_MAX_PAIRS = 1 << 20


def sort_by_expert(
    top_k_index: torch.Tensor,
    num_experts: int,
    num_slots: int | None = None,
    with_token: bool = True,
    triton: bool | None = None,
    counting: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the T·k (token, slot) pairs by expert without a host sync.

    Returns `token [S]` (source token of each sorted row; None with `with_token=False`, for callers that read the
    token from `order` themselves, as the decode kernels do), `order [S]` (flat slot index of each sorted row; ties
    in flat index order), `position [T·k]` (sorted row of each flat slot: the inverse of `order`) and `offsets [E]`
    (int32 end row of each expert). Slots with index ≥ `num_experts` sort last and lie past `offsets[-1]`. When
    the caller knows the number of real slots (`num_slots`, e.g. under expert parallelism, where most slots belong
    to other ranks), only those rows and one dropped row are kept (S = num_slots + 1) and every dropped slot points
    at that row. Triton kernels compute all of it where Triton serves the tensors (`triton=None`: decided from the
    device; the experts pass their plan's choice) and the sizes are within the limits above — more pairs than the
    one-launch kernel serves only with `counting` (the plan's `counting_sort`) —, torch ops elsewhere;
    the outputs are the same (the counting sort orders ids past the sentinel `num_experts` as the sentinel, in flat
    order, where torch's sort orders them by value: all of them lie past `offsets[-1]`).
    """
    num_pairs = top_k_index.numel()
    if (
        (triton_serves(top_k_index) if triton is None else triton)
        and num_pairs <= (TRITON_SORT_MAX_PAIRS if counting else TRITON_SORT_ONE_LAUNCH_MAX_PAIRS)
        and num_experts <= TRITON_SORT_MAX_EXPERTS
    ):
        sorts = kernels.sort_by_expert
        sort = sorts.sort_by_expert if num_pairs <= TRITON_SORT_ONE_LAUNCH_MAX_PAIRS else sorts.counting_sort_by_expert
        token, order, position, offsets = sort(top_k_index, num_experts, num_slots)
        return token if with_token else None, order, position, offsets
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
    token = torch.div(order, top_k_index.shape[-1], rounding_mode="floor") if with_token else None
    return token, order, position, offsets


def grouped_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_slots: int | None = None,
    weight_grads: WeightGrads | None = None,
) -> torch.Tensor:
    """hf-moe's experts implementation (`hf_moe_grouped`): sort the (token, slot) pairs by expert, run the gate/up
    (non-gated: up) and down projections as grouped GEMMs with the activation and the routing weight fused between
    them, and sum each
    token's k outputs in a fixed order (deterministic, no atomics). No host sync on CUDA. `num_slots`, the number
    of slots with a real expert when the caller knows it, sizes the buffers to those slots (see `sort_by_expert`).
    With `weight_grads`, backward may defer the expert weights' gradients to it (see `ExpertsPlan`).
    Inference with few rows per expert (decode; CUDA, half precision, SiLU, no gradient needed) runs two
    weight-streaming kernels instead of the grouped GEMMs (see `hf_moe.moe.kernels.decode`).
    """
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)
    num_rows = top_k_index.numel() if num_slots is None else min(num_slots + 1, top_k_index.numel())
    plan = plan_experts(self, hidden_states, top_k_weights, num_rows, weight_grads)
    token, order, position, offsets = sort_by_expert(
        top_k_index, self.num_experts, num_slots, not plan.decode, plan.triton_sort, plan.counting_sort
    )
    dtype = self.down_proj.dtype
    x = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)
    gate_up_proj, down_proj = input_projection(self)[0], self.down_proj
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, gate_up_proj, down_proj, top_k_weights)
    )
    if plan.decode:
        out = kernels.decode.decode_experts_forward(x, gate_up_proj, down_proj, top_k_weights, order, position, offsets)
    elif not differentiable:  # inference: the two nodes' forward steps without autograd's host cost
        weight = top_k_weights.reshape(-1).index_select(0, order)  # each sorted row's routing weight
        act = _gate_up_forward(x, gate_up_proj, weight, token, offsets, self.act_fn, plan)[2]
        out = _down_forward(act, down_proj, position.view(x.shape[0], -1), offsets, plan)
    else:
        weight = top_k_weights.detach().reshape(-1).index_select(0, order)
        by_token = position.view(x.shape[0], -1)
        gate_up, act = _GateUpFunction.apply(
            x, gate_up_proj, weight, token, by_token, offsets, self.act_fn, plan, weight_grads
        )
        out = _DownFunction.apply(
            gate_up, act, top_k_weights, down_proj, weight, token, by_token, offsets, self.act_fn,
            plan.gated and self.config.hidden_act in ("silu", "swish"), plan, weight_grads,
        )
    return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register("hf_moe_grouped", grouped_experts_forward)
