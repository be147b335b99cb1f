"""The table gradients of product-key experts (`product_key_experts`' backward), expert-centric and deterministic.

`grad_up[e] = Σ grad_pre · x[t]` and `grad_down[e] = Σ coeff · g[t]` over the (token, slot) pairs routed to expert
e. The pairs are sorted by expert (stable, on the device), so each expert's pairs form a run of sorted positions:

- Short runs: each program looks at a few sorted positions; the first position of an expert's run finds the run's
  end, sums the run pair by pair in sorted order over all columns and writes the expert's two rows.
- Long runs (≥ `_LONG_RUN` pairs: a router sending many tokens to a few experts) would leave a few programs summing
  most pairs one by one, so the owner lists them instead, cut into segments of `_SEGMENT` pairs. A second kernel
  gives each (segment, column slice) to one program, which sums the segment in `[_LONG_RUN_ROWS, slice]` tiles in
  sorted order; a run of one segment is written at once, a longer one's segments write partial sums, and the
  segment that arrives last (one counter per run and slice) adds the run's partials in segment order and writes the
  rows.

Every row is thus summed in an order fixed by the sorted pairs, whatever the programs' timing: the gradients are
deterministic. The atomics only hand out list slots and count arrivals. Rows of experts without pairs stay zero.
No host sync: every grid and buffer is sized from the shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# sorted positions per first-kernel program: most start no run, and a few per program keep far more programs than the
# GPU holds at a time (one per position would be mostly programs that exit at once)
_POSITIONS_PER_PROGRAM = 8
# runs of ≥ `_LONG_RUN` pairs go to the second kernel in segments of `_SEGMENT` pairs, each summed by programs of
# `_LONG_RUN_COLUMNS` columns `_LONG_RUN_ROWS` pairs at a time
_LONG_RUN, _SEGMENT, _LONG_RUN_COLUMNS, _LONG_RUN_ROWS = 256, 1024, 128, 32
_MAX_PROGRAMS = 1024  # second kernel's programs per column slice; they stride over the listed segments


@triton.jit
def _pair_sums(x_ptr, grad_out_ptr, order_ptr, grad_pre_ptr, coeff_ptr, start, end, cols, col_ok, hidden,
               TOP_K: tl.constexpr, ROWS: tl.constexpr):
    """`(Σ grad_pre · x, Σ coeff · g)` over the sorted positions `start..end` at `cols`, float32: one pair at a time
    (`ROWS` 1) or `[ROWS, cols]` tiles, each summed over its rows, the tiles in sorted order."""
    grad_up = tl.zeros(cols.shape, dtype=tl.float32)
    grad_down = tl.zeros(cols.shape, dtype=tl.float32)
    if ROWS == 1:
        for position in range(start, end):
            pair = tl.load(order_ptr + position)
            row = (pair // TOP_K) * hidden
            x = tl.load(x_ptr + row + cols, mask=col_ok, other=0.0).to(tl.float32)
            g = tl.load(grad_out_ptr + row + cols, mask=col_ok, other=0.0).to(tl.float32)
            grad_up += tl.load(grad_pre_ptr + pair) * x
            grad_down += tl.load(coeff_ptr + pair) * g
    else:
        rows = tl.arange(0, ROWS)
        for first in range(start, end, ROWS):
            row_ok = first + rows < end
            pair = tl.load(order_ptr + first + rows, mask=row_ok, other=0)
            offsets = (pair // TOP_K).to(tl.int64)[:, None] * hidden + cols[None, :]
            tile_ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
            g = tl.load(grad_out_ptr + offsets, mask=tile_ok, other=0.0).to(tl.float32)
            grad_up += tl.sum(tl.load(grad_pre_ptr + pair, mask=row_ok, other=0.0)[:, None] * x, axis=0)
            grad_down += tl.sum(tl.load(coeff_ptr + pair, mask=row_ok, other=0.0)[:, None] * g, axis=0)
    return grad_up, grad_down


@triton.jit
def _store_rows(grad_up_ptr, grad_down_ptr, expert, cols, col_ok, grad_up, grad_down, hidden):
    row = expert.to(tl.int64) * hidden
    tl.store(grad_up_ptr + row + cols, grad_up.to(grad_up_ptr.dtype.element_ty), mask=col_ok)
    tl.store(grad_down_ptr + row + cols, grad_down.to(grad_down_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _runs_kernel(
    x_ptr, grad_out_ptr, order_ptr, sorted_expert_ptr, grad_pre_ptr, coeff_ptr, grad_up_ptr, grad_down_ptr, list_ptr,
    runs_at, segments_at, num_pairs, num_experts, hidden: tl.constexpr, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
    POSITIONS: tl.constexpr, BLOCK_SCAN: tl.constexpr, LONG_RUN: tl.constexpr, SEGMENT: tl.constexpr,
):
    """Short runs summed and written; long runs listed in `list_ptr` (see [`table_gradients`])."""
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
            if end - start >= LONG_RUN:
                segments = tl.cdiv(end - start, SEGMENT)
                run = tl.atomic_add(list_ptr, 1)
                segment = tl.atomic_add(list_ptr + 1, segments)
                partial = tl.atomic_add(list_ptr + 2, tl.where(segments > 1, segments, 0))
                entry = list_ptr + runs_at + 4 * run
                tl.store(entry, expert)
                tl.store(entry + 1, start)
                tl.store(entry + 2, end)
                tl.store(entry + 3, partial)
                for i in range(segments):
                    tl.store(list_ptr + segments_at + 2 * (segment + i), run)
                    tl.store(list_ptr + segments_at + 2 * (segment + i) + 1, i)
            else:
                for col in range(0, hidden, BLOCK_H):
                    cols = col + tl.arange(0, BLOCK_H)
                    col_ok = cols < hidden
                    grad_up, grad_down = _pair_sums(x_ptr, grad_out_ptr, order_ptr, grad_pre_ptr, coeff_ptr, start,
                                                    end, cols, col_ok, hidden, TOP_K, 1)
                    _store_rows(grad_up_ptr, grad_down_ptr, expert, cols, col_ok, grad_up, grad_down, hidden)


@triton.jit
def _segments_kernel(
    x_ptr, grad_out_ptr, order_ptr, grad_pre_ptr, coeff_ptr, grad_up_ptr, grad_down_ptr, list_ptr, partial_ptr,
    runs_at, segments_at, hidden: tl.constexpr, TOP_K: tl.constexpr, SEGMENT: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """The listed segments (program axis 0, strided) × column slices (axis 1); see the module docstring."""
    column_slice = tl.program_id(1)
    cols = column_slice * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    for segment in range(tl.program_id(0), tl.load(list_ptr + 1), tl.num_programs(0)):
        run = tl.load(list_ptr + segments_at + 2 * segment)
        i = tl.load(list_ptr + segments_at + 2 * segment + 1)
        entry = list_ptr + runs_at + 4 * run
        expert, run_start, run_end = tl.load(entry), tl.load(entry + 1), tl.load(entry + 2)
        first_partial = tl.load(entry + 3)
        start = run_start + i * SEGMENT
        grad_up, grad_down = _pair_sums(x_ptr, grad_out_ptr, order_ptr, grad_pre_ptr, coeff_ptr, start,
                                        tl.minimum(run_end, start + SEGMENT), cols, col_ok, hidden, TOP_K, ROWS)
        segments = tl.cdiv(run_end - run_start, SEGMENT)
        if segments == 1:
            _store_rows(grad_up_ptr, grad_down_ptr, expert, cols, col_ok, grad_up, grad_down, hidden)
        else:  # partial sums; the run's last arriving segment adds them all, in segment order
            at = (first_partial + i).to(tl.int64) * 2 * hidden + cols
            tl.store(partial_ptr + at, grad_up, mask=col_ok)
            tl.store(partial_ptr + at + hidden, grad_down, mask=col_ok)
            tl.debug_barrier()  # every thread's stores issued before the arrival is counted (release)
            arrivals = list_ptr + 3 + run * tl.num_programs(1) + column_slice
            if tl.atomic_add(arrivals, 1, sem="acq_rel") == segments - 1:
                grad_up = tl.zeros([BLOCK_H], dtype=tl.float32)
                grad_down = tl.zeros([BLOCK_H], dtype=tl.float32)
                for j in range(segments):
                    at = (first_partial + j).to(tl.int64) * 2 * hidden + cols
                    grad_up += tl.load(partial_ptr + at, mask=col_ok, other=0.0, cache_modifier=".cg")
                    grad_down += tl.load(partial_ptr + at + hidden, mask=col_ok, other=0.0, cache_modifier=".cg")
                _store_rows(grad_up_ptr, grad_down_ptr, expert, cols, col_ok, grad_up, grad_down, hidden)


def table_gradients(
    x: torch.Tensor, grad_out: torch.Tensor, keys: torch.Tensor, grad_pre: torch.Tensor, coeff: torch.Tensor,
    table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(grad_up, grad_down)`, dense like `table [E, H]` with untouched rows zero, from `x`, `grad_out [T, H]`, the
    sort keys `[T, k]` (each pair's expert, sentinels as E), `grad_pre` and `coeff [T, k]` float32 (the gradient
    of each pair's pre-activation, and `w · act(pre)`)."""
    num_experts, hidden = table.shape
    num_pairs = keys.numel()
    grad_up, grad_down = torch.zeros_like(table), torch.zeros_like(table)
    sorted_expert, order = torch.sort(keys.view(-1), stable=True)
    slice_h = min(triton.next_power_of_2(hidden), _LONG_RUN_COLUMNS)
    slices = triton.cdiv(hidden, slice_h)
    # one zeroed int32 list: counts (runs, segments, partial slots), arrivals [run, slice], runs (expert, start, end,
    # first partial slot), segments (run, index in the run); sized for the most long runs and segments there can be
    max_runs = num_pairs // _LONG_RUN
    max_segments = num_pairs // _SEGMENT + max_runs
    runs_at = 3 + max_runs * slices
    segments_at = runs_at + 4 * max_runs
    lists = torch.zeros(segments_at + 2 * max_segments, dtype=torch.int32, device=x.device)
    _runs_kernel[(triton.cdiv(num_pairs, _POSITIONS_PER_PROGRAM),)](
        x, grad_out, order, sorted_expert, grad_pre, coeff, grad_up, grad_down, lists, runs_at, segments_at,
        num_pairs, num_experts, hidden, TOP_K=keys.shape[1], BLOCK_H=min(triton.next_power_of_2(hidden), 1024),
        POSITIONS=_POSITIONS_PER_PROGRAM, BLOCK_SCAN=64, LONG_RUN=_LONG_RUN, SEGMENT=_SEGMENT,
    )
    if max_runs:
        # a run of more than one segment is longer than _SEGMENT, so fewer than 2·num_pairs/_SEGMENT partial slots
        partials = torch.empty(max(1, 2 * num_pairs // _SEGMENT), 2, hidden, dtype=torch.float32, device=x.device)
        _segments_kernel[(min(max_segments, _MAX_PROGRAMS), slices)](
            x, grad_out, order, grad_pre, coeff, grad_up, grad_down, lists, partials, runs_at, segments_at, hidden,
            TOP_K=keys.shape[1], SEGMENT=_SEGMENT, ROWS=_LONG_RUN_ROWS, BLOCK_H=slice_h,
        )
    return grad_up, grad_down
