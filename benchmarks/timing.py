"""Timing for every suite: device-time events, warm-up/repeat loops, interleaved A/B, host time, ratios.

On CUDA a call is timed with CUDA events between two synchronisations (the GPU's time for the work the call issued);
on CPU the same interface reads the host clock. A/B comparisons alternate the two variants round by round, because two
variants timed one after the other drift apart with clocks and temperature; alternating them puts the same drift on
both.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch


class HostEvent:
    """`torch.cuda.Event`'s timing interface on the host clock, for runs without a GPU."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: HostEvent) -> float:
        """Milliseconds from this event to `end`, as `torch.cuda.Event.elapsed_time`."""
        return (end.t - self.t) * 1e3


def event(device: str) -> torch.cuda.Event | HostEvent:
    """A timing event: a CUDA event on `cuda`, the host clock elsewhere."""
    return torch.cuda.Event(enable_timing=True) if device == "cuda" else HostEvent()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_rounds(
    fns: dict[str, Callable[[], object]], device: str, reps: int, warmup: int = 3,
    before_each: Callable[[], None] | None = None,
) -> dict[str, list[tuple[float, float]]]:
    """Run each of `fns` in turn for `warmup` rounds, then `reps` timed rounds; per name the (device seconds, host
    seconds to issue the call) of every timed call. Each call starts on an idle device, after `before_each` (e.g. a
    barrier that aligns the ranks)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if before_each is not None:
                before_each()
            synchronize(device)
            start, end = event(device), event(device)
            start.record()
            issued = time.perf_counter()
            fn()
            host = time.perf_counter() - issued
            end.record()
            synchronize(device)
            runs[name].append((start.elapsed_time(end) / 1e3, host))
    return runs


def median_and_min(fn: Callable[[], object], device: str, reps: int, warmup: int = 3) -> tuple[float, float]:
    """Median and minimum seconds per call of `fn`, each call timed alone from an idle device."""
    seconds = [device_s for device_s, _ in timed_rounds({"": fn}, device, reps, warmup)[""]]
    return statistics.median(seconds), min(seconds)


def device_times(
    fns: dict[str, Callable[[], object]], device: str, reps: int, warmup: int = 3,
    before_each: Callable[[], None] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Median device seconds of each of `fns` over rounds that run them in turn, and the median host seconds to issue
    each (until it returned). A host time close to the device time means the step is host-bound."""
    runs = timed_rounds(fns, device, reps, warmup, before_each)
    return ({name: statistics.median(d for d, _ in r) for name, r in runs.items()},
            {name: statistics.median(h for _, h in r) for name, r in runs.items()})


def ms_per_call(fn: Callable[[], object], calls: int, device: str = "cuda") -> float:
    """Milliseconds per call of `calls` back-to-back calls of `fn`, timed as one (launches overlap device work)."""
    synchronize(device)
    start, end = event(device), event(device)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    synchronize(device)
    return start.elapsed_time(end) / calls


def interleaved_ms(
    fn: Callable[[], object], variant: Callable[[bool], AbstractContextManager], rounds: int = 10, calls: int = 5,
    device: str = "cuda",
) -> tuple[float, float]:
    """Median milliseconds per call of `fn` inside `variant(True)` and inside `variant(False)`, alternated for
    `rounds` rounds of `calls` back-to-back calls, after a warm-up of both."""
    for enabled in (True, False):
        with variant(enabled):
            ms_per_call(fn, 3, device)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for enabled in (True, False):
            with variant(enabled):
                times[enabled].append(ms_per_call(fn, calls, device))
    return statistics.median(times[True]), statistics.median(times[False])


def host_us(fn: Callable[[], object], device: str, calls: int, repeats: int) -> tuple[float, float]:
    """Median and minimum over `repeats` of the mean wall time of `calls` back-to-back calls with one synchronisation
    at the end, in µs: the host's time per call where the device work is small."""
    for _ in range(calls):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times), min(times)


def capture(fn: Callable[[], object], capture_error_mode: str = "global") -> tuple[torch.cuda.CUDAGraph, object]:
    """`fn` captured in a CUDA graph after three warm-up calls on a side stream (lazy inits, autotuning): the graph
    and what the captured call returned (its buffers, which every replay rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=capture_error_mode):
        out = fn()
    return graph, out


def cuda_graph_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median seconds per replay of `fn` captured in a CUDA graph ([`capture`])."""
    return median_and_min(capture(fn)[0].replay, "cuda", reps)[0]


def triton_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn` by `triton.testing.do_bench` (flushes L2 between calls; GPU kernels alone)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def gpu_work(fn: Callable[[], object], device: str) -> dict:
    """What one call of `fn` runs on the GPU (torch.profiler, CUDA activity, after one call outside it): `kernels`
    launched and `gpu_ms`, the sum of their durations; against the timed ms it tells how much of a call the GPU
    waits for the host. Call it after a process's timings: the profiler leaves CUPTI attached, and every later
    launch costs more host time."""
    if device != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    return {"kernels": sum(e.count for e in events),
            "gpu_ms": round(sum(e.self_device_time_total for e in events) / 1e3, 3)}


def ratio(numerator: float, denominator: float, digits: int = 2) -> str:
    """`numerator / denominator` written as a factor, e.g. `1.27×` (> 1: the denominator is faster)."""
    return f"{numerator / denominator:.{digits}f}×"


def seconds_per_call(fn, reps: int, device: str = "cuda") -> float:
    """Median device seconds of `fn` over `reps` calls, each timed alone."""
    return median_and_min(fn, device, reps, warmup=0)[0]


def first_call_seconds(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start
