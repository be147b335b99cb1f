"""Timing a module's forward and training step from an idle GPU, with the GPU work of each call profiled after all
timings (the product-key suite's peers and hf-moe side by side)."""

from __future__ import annotations

import statistics
import traceback

import torch
from torch import nn

from .timing import capture, gpu_work, timed_rounds


def measure(name: str, module: nn.Module, x: torch.Tensor, reps: int, device: str, work: list | None,
            backward: bool = True, graph_steps: bool = False, forward_grad: bool = False) -> dict:
    """Forward (no grad) and forward+backward median ms (`timing.timed_rounds`: each call from an idle device, timed
    with CUDA events), the median host ms to issue each call and the peak memory (MiB) of each above what was
    allocated; each call goes to `work` (None: not profiled) for [`add_gpu_work`], which the part runs after all
    its timings. A training step starts with the module's gradients unset, as after a loop's `optimizer.zero_grad()`
    (otherwise autograd adds each step's gradients into the last ones: a pass over every weight, 1.5 GiB per table of
    a product-key layer at E 262,144, that only gradient accumulation's later micro-batches pay). `graph_steps`: the
    module replays torch.compile's CUDA graphs (`reduce-overhead`), so each call starts a new step (a training step
    reads the forward's outputs, which the next replay would overwrite). `forward_grad`: the forward runs with
    gradients on (CUDA graphs of a training step replay only there)."""
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    step = torch.compiler.cudagraph_mark_step_begin if graph_steps else lambda: None

    def forward():
        step()
        with torch.set_grad_enabled(forward_grad):
            first(module(x))

    grad = torch.randn_like(x)

    def train():
        step()
        module.zero_grad(set_to_none=True)
        first(module(x.requires_grad_(True))).backward(grad)
        x.grad = None

    row = {"module": name}
    for what, fn in (("fwd", forward), ("fwd_bwd", train)) if backward else (("fwd", forward),):
        try:
            fn()
            if device == "cuda":
                module.zero_grad(set_to_none=True)  # the peak of a step includes the gradients it allocates
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                row[f"{what}_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            runs = timed_rounds({what: fn}, device, reps)[what]
            row[f"{what}_ms"] = round(statistics.median(d for d, _ in runs) * 1e3, 3)
            row[f"{what}_host_ms"] = round(statistics.median(h for _, h in runs) * 1e3, 3)
            if work is not None:
                work.append((row, what, fn))
        except Exception as error:  # a peer that cannot run a part: recorded, the suite goes on
            row[f"{what}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            traceback.print_exc(limit=2)
        module.zero_grad(set_to_none=True)
    return row


def add_gpu_work(work: list, device: str) -> None:
    """The kernels of each call measured into `work` and their summed GPU time (`timing.gpu_work`), added to its row.
    Runs after the part's timings: once torch.profiler has run, every later launch of the process costs more host
    time."""
    for row, what, fn in work:
        try:
            row.update({f"{what}_{key}": value for key, value in gpu_work(fn, device).items()})
        except Exception as error:
            row[f"{what}_profile_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    work.clear()


class InferenceGraph(nn.Module):
    """`module`'s no-grad forward at the shape of `x`, captured in a CUDA graph; a call copies its input into the
    graph's and replays it (the graph's output buffer is returned, overwritten by the next call)."""

    def __init__(self, module: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.static_x = x.detach().clone()

        @torch.no_grad()
        def forward_once():
            return module(self.static_x)

        self.graph, out = capture(forward_once)
        self.static_out = out[0] if isinstance(out, tuple) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out
