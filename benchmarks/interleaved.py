"""Interleaved A/B timing for benchmarks that compare two paths of hf-moe on one GPU.

Two variants timed one after the other drift apart with clocks and temperature; alternating them round by round
and taking each one's median puts the same drift on both.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch


def _ms_per_call(fn: Callable[[], object], variant: AbstractContextManager, calls: int) -> float:
    with variant:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def interleaved_ms(
    fn: Callable[[], object], variant: Callable[[bool], AbstractContextManager], rounds: int = 10, calls: int = 5
) -> tuple[float, float]:
    """Median milliseconds per call of `fn` inside `variant(True)` and inside `variant(False)`, alternated for
    `rounds` rounds of `calls` back-to-back calls, after a warm-up of both."""
    for enabled in (True, False):
        _ms_per_call(fn, variant(enabled), calls=3)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for enabled in (True, False):
            times[enabled].append(_ms_per_call(fn, variant(enabled), calls))
    return statistics.median(times[True]), statistics.median(times[False])
