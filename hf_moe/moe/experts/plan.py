"""Which kernels `hf_moe_grouped` runs for one call: one function, `plan_experts`, returns a frozen `ExpertsPlan`.

The plan is decided on the host from the device, dtype, shapes and strides of the tensors, the activation, grad
mode and whether torch.compile is tracing: nothing waits for the GPU, so CUDA graphs and torch.compile see one
path. The forward computes it once; its backward follows the same plan. `override_plan` is the one way to force a
plan field or change a threshold (tests, experiments, benchmarks).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from .. import kernels
from ..ops import triton_serves
from .module import input_projection

Gemm = Literal["triton", "grouped_mm", "per_expert"]
"""How a projection's GEMMs run: hf-moe's Triton grouped GEMM (`hf_moe.moe.kernels.grouped_gemm`; where its
operands do not meet TMA's alignment it falls back to torch's), torch's grouped GEMM (CUDA bf16: no host sync,
rows past `offsets[-1]` left unwritten), or one `mm` per expert (reads the offsets on the host, zeroes those rows;
a custom op, `hf_moe::per_expert_mm`, so torch.compile traces it as one node without a graph break)."""

WeightGradGemm = Literal["quack", "grouped_mm", "per_expert"]
"""How the expert weights' gradients (`out[e] = a_eᵀ @ b_e`) run: quack-kernels' grouped GEMM with variable-length
K (`hf_moe.moe.kernels.quack_gemm`, optional), torch's grouped GEMM, or one `mm` per expert (the custom op
`hf_moe::per_expert_weight_grad`). All three read only the rows before `offsets[-1]` and zero idle experts."""

# hf-moe's Triton grouped GEMMs replace torch's for a projection only with at most this many (token, slot) rows per
# expert on average (with more, torch's tiles are as fast or faster) and at least this many multiply-adds per GEMM
# (below it the eager step is bound by host launches, and a Triton launch costs more host time than torch's).
# Rule and measurements: docs/decisions/own-grouped-gemms.md.
OWN_GEMM_ROWS_PER_EXPERT = 512
OWN_GEMM_MIN_MULTIPLY_ADDS = 1 << 35

# Inference runs the weight-streaming decode kernels (`hf_moe.moe.kernels.decode`) instead of the grouped GEMMs with
# at most this many (token, slot) rows per expert on average: there the GEMMs are bound by reading the expert weights
# and the general path's extra kernels and partial tiles cost more. Rule and measurements:
# docs/decisions/decode-kernels.md.
DECODE_ROWS_PER_EXPERT = 32
# The counting sort by expert (two Triton launches, above the one-launch kernel's 1024 pairs) orders prefill and
# training pairs on CUDA: fewer host ops before the first GEMM than torch's sort, same order, no slower on the
# GPU (docs/decisions/sort-by-expert.md). `override_plan(counting_sort=False)` switches back to torch's sort.
COUNTING_SORT = True

_HAS_TORCH_GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


class WeightGrads(Protocol):
    """Where the experts' backward may defer its weight-gradient work (e.g. a queue an all-to-all drains)."""

    def defer(self, work: Callable[[], None]) -> None: ...


@dataclass(frozen=True)
class ExpertsPlan:
    """The kernels of one `hf_moe_grouped` call (forward and its backward)."""

    gate_up_gemm: Gemm
    """The gate/up projection's GEMMs (forward, and the input gradient through it in backward)."""
    down_gemm: Gemm
    """The down projection's GEMMs (forward, and the gradient of its input in backward)."""
    fused_gate_up_swiglu: bool
    """The gate/up GEMM computes SwiGLU and the routing weight in its epilogue (Triton, stored weight layout)."""
    triton_rows: bool
    """Gather and gather-sum (combine) run as Triton kernels (`hf_moe.moe.ops`), else torch ops."""
    triton_sort: bool
    """The (token, slot) pairs are ordered by expert with Triton kernels within their size limits, else with
    torch's sort (`hf_moe.moe.experts.grouped.sort_by_expert`; same outputs)."""
    counting_sort: bool
    """With `triton_sort`, the counting sort orders more pairs than the one-launch kernel serves (see
    `COUNTING_SORT`)."""
    triton_swiglu: bool
    """SwiGLU forward and backward run as Triton kernels (SiLU only), else torch ops."""
    in_place_backward: bool
    """The SwiGLU backward overwrites the saved gate/up projection with its gradient (eager Triton path only)."""
    decode: bool
    """Inference with few rows per expert: the decode kernels replace the whole grouped path."""
    weight_grad_gemm: WeightGradGemm
    """The expert weights' gradient GEMMs (both projections): quack's where it is installed and would otherwise be
    torch's grouped GEMM (docs/decisions/quack.md)."""
    defer_weight_grads: bool
    """Backward hands the expert weights' gradients to `weight_grads` instead of returning them."""
    gated: bool
    """SwiGLU experts (`gate_up_proj`); False: non-gated `act(up)` experts (`up_proj`), which the SwiGLU kernels
    (fused epilogue, Triton SwiGLU, decode) do not serve."""
    traced: bool
    """torch.compile (or torch.export) traces this call: every step runs out of place (the compiler plans the
    buffers) and none is deferred; the Triton kernels are the same as in eager mode, traced as the custom ops
    `hf_moe::*` (`hf_moe.moe.kernels.library`)."""

    @property
    def tail_unwritten(self) -> bool:
        """Whether the GEMMs leave the rows past `offsets[-1]` unwritten (every consumer must then mask them)."""
        return self.gate_up_gemm != "per_expert"


_SETTINGS = {
    "own_gemm_rows_per_expert": lambda: OWN_GEMM_ROWS_PER_EXPERT,
    "own_gemm_min_multiply_adds": lambda: OWN_GEMM_MIN_MULTIPLY_ADDS,
    "decode_rows_per_expert": lambda: DECODE_ROWS_PER_EXPERT,
    "triton": lambda: None,  # None: Triton kernels serve CUDA tensors when Triton is installed
    "grouped_mm": lambda: None,  # None: torch's grouped GEMM for CUDA bf16 tensors when torch has it
    "quack": lambda: None,  # None: quack's weight gradients for CUDA bf16 tensors where quack runs (Hopper+)
    "counting_sort": lambda: COUNTING_SORT,
}
_FIELDS = tuple(f.name for f in dataclasses.fields(ExpertsPlan))
_overrides: dict[str, object] = {}


@contextlib.contextmanager
def override_plan(**changes: object) -> Iterator[None]:
    """Inside the block, every plan is computed with `changes` applied: a threshold (`own_gemm_rows_per_expert`,
    `own_gemm_min_multiply_adds`, `decode_rows_per_expert`), an availability (`triton=True`: treat the tensors as
    served by the Triton kernels; `grouped_mm=True`: as served by torch's grouped GEMM; `quack=True`: as served by
    quack's for the weight gradients; False: never), or a plan
    field forced to a value (e.g. `decode=False`, `gate_up_gemm="grouped_mm"`). Hold it over forward and backward."""
    unknown = sorted(set(changes) - set(_SETTINGS) - set(_FIELDS))
    if unknown:
        raise ValueError(f"override_plan: unknown names {unknown}; expected settings {sorted(_SETTINGS)} or plan "
                         f"fields {list(_FIELDS)}")
    saved = dict(_overrides)
    _overrides.update(changes)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def _setting(name: str):
    return _overrides[name] if name in _overrides else _SETTINGS[name]()


def _gemm(num_rows: int, num_experts: int, k: int, n: int, grouped: bool, triton: bool) -> Gemm:
    """One projection's GEMM (`[S, k] @ [E, k, n]`): hf-moe's Triton one on CUDA bf16 with few rows per expert and
    enough work (eager or traced: torch.compile sees it as the custom op `hf_moe::grouped_mm`)."""
    if not grouped:
        return "per_expert"
    own = (
        triton
        and num_rows <= _setting("own_gemm_rows_per_expert") * num_experts
        and num_rows * k * n >= _setting("own_gemm_min_multiply_adds")
    )
    return "triton" if own else "grouped_mm"


def plan_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_rows: int,
    weight_grads: WeightGrads | None = None,
) -> ExpertsPlan:
    """The plan of `hf_moe_grouped` on `num_rows` expert-sorted (token, slot) rows of `hidden_states` for
    `experts` (anything with `gate_up_proj` or `up_proj`, `down_proj`, `num_experts` and `config.hidden_act`)."""
    (gate_up_proj, gated), down_proj = input_projection(experts), experts.down_proj
    num_experts, two_inter, hidden = gate_up_proj.shape
    dtype, traced = gate_up_proj.dtype, torch.compiler.is_compiling()
    triton = _setting("triton")
    triton = triton_serves(hidden_states) if triton is None else triton
    grouped = _setting("grouped_mm")
    if grouped is None:
        grouped = hidden_states.is_cuda and dtype == torch.bfloat16 and _HAS_TORCH_GROUPED_MM
    quack = _setting("quack")
    if quack is None:
        quack = hidden_states.is_cuda and dtype == torch.bfloat16 and kernels.quack_gemm.available()
    swiglu = triton and gated and experts.config.hidden_act in ("silu", "swish")
    params = (gate_up_proj, down_proj)
    grad = torch.is_grad_enabled()
    gate_up_gemm = _gemm(num_rows, num_experts, hidden, two_inter, grouped, triton)
    plan = ExpertsPlan(
        gate_up_gemm=gate_up_gemm,
        down_gemm=_gemm(num_rows, num_experts, down_proj.shape[-1], hidden, grouped, triton),
        fused_gate_up_swiglu=swiglu and gate_up_gemm == "triton" and gate_up_proj.stride(2) == 1,
        triton_rows=triton,
        triton_sort=triton,
        counting_sort=triton and bool(_setting("counting_sort")),
        triton_swiglu=swiglu,
        in_place_backward=swiglu and not traced,
        decode=(
            swiglu
            and dtype in (torch.bfloat16, torch.float16)
            and not (grad and any(t.requires_grad for t in (hidden_states, top_k_weights, *params)))
            and num_rows <= _setting("decode_rows_per_expert") * num_experts
        ),
        weight_grad_gemm="per_expert" if not grouped else "quack" if quack else "grouped_mm",
        defer_weight_grads=(
            weight_grads is not None
            and grad
            and any(p.requires_grad for p in params)
            and all(p.is_leaf for p in params)
            and not traced
        ),
        gated=gated,
        traced=traced,
    )
    forced = {name: value for name, value in _overrides.items() if name in _FIELDS}
    return dataclasses.replace(plan, **forced) if forced else plan
