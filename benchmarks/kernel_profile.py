"""`python -m benchmarks compile --parts profile`: where a compiled training step's GPU time goes, hf-moe against
transformers' model (default attention and each `--peer-attention` kernel), kernels summed by kind; and how much of
the step the GPU sits idle between kernels (a host-bound step shows here, a GPU-bound one does not)."""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from .compile_models import case_name, training_cases, training_step

# (substring of a kernel's name, kind), first match wins; names as torch.profiler reports them on Hopper
KINDS = (
    ("cudnn", "attention"), ("flash", "attention"), ("fmha", "attention"), ("flex_attention", "attention"),
    ("nvjet", "dense GEMM (cuBLAS)"), ("_grouped_mm", "routed GEMM"), ("gate_up_swiglu", "routed GEMM"),
    ("quack", "routed GEMM"), ("cutlass", "routed GEMM"), ("gemm", "routed GEMM"), ("cross_entropy", "loss"),
    ("gather", "expert glue"), ("swiglu_bwd", "expert glue"), ("sort", "expert glue"), ("top_k", "router"),
    ("triton_", "inductor"),
)
# kernels listed by name in a profile row, the largest first
TOP_KERNELS = 30
# idle gaps listed in a profile row, the longest first
TOP_GAPS = 10
# steps profiled back to back in the `profile-back-to-back_*` rows
BACK_TO_BACK_STEPS = 3


def kind(name: str) -> str:
    lower = name.lower()
    return next((k for key, k in KINDS if key in lower), "other")


def summarize(kernels: list[tuple[float, float, str]], top: int = TOP_KERNELS, steps: int = 1) -> dict:
    """(start µs, end µs, name) of `steps` steps' kernels, per step: ms by kind, their sum, the time at least one
    kernel ran (busy), the first start to last end (span), span − busy (idle: the GPU waited for the host), the `top`
    kernel names (first 80 characters) by summed ms with their launches, and the `TOP_GAPS` longest waits with the
    kernels before and after each (first 60 characters), where the idle time went."""
    by_kind: collections.Counter = collections.Counter()
    by_name: collections.Counter = collections.Counter()
    launches: collections.Counter = collections.Counter()
    gaps: list[tuple[float, str, str]] = []
    busy, end, last = 0.0, None, ""
    for start, stop, name in sorted(kernels):
        by_kind[kind(name)] += (stop - start) / 1e3
        by_name[name[:80]] += (stop - start) / 1e3
        launches[name[:80]] += 1
        if end is not None and start > end:
            gaps.append(((start - end) / 1e3, last[:60], name[:60]))
        busy += max(0.0, stop - (start if end is None else max(start, end))) / 1e3
        if end is None or stop >= end:
            end, last = stop, name
    span = (max(k[1] for k in kernels) - min(k[0] for k in kernels)) / 1e3 if kernels else 0.0
    return {"kernel_ms": {k: round(v / steps, 3) for k, v in by_kind.most_common()},
            "kernels_ms": round(sum(by_kind.values()) / steps, 3), "busy_ms": round(busy / steps, 3),
            "span_ms": round(span / steps, 3), "idle_ms": round((span - busy) / steps, 3), "steps": steps,
            "top_kernels": [[name, round(ms / steps, 3), launches[name] // steps]
                            for name, ms in by_name.most_common(top)],
            "longest_gaps": [[round(ms, 3), before, after] for ms, before, after in sorted(gaps, reverse=True)[:TOP_GAPS]]}


def profile_steps(step: Callable[[], None], steps: int = 1) -> dict:
    """`steps` profiled calls of `step` back to back (after the caller's warm-up), summarized per step."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return summarize([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA], steps=steps)


def profile_train(models: dict, seq: int, record: Callable[[dict], None], peer_attention: tuple[str, ...]) -> None:
    """Rows `profile_<model>[-<attention>]_compiled`: a compiled training step of 4 × `seq` tokens from an idle GPU,
    profiled; rows `profile-back-to-back_*`: `BACK_TO_BACK_STEPS` steps with no wait between them, per step."""
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (4, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    for name, attention in training_cases(models, peer_attention):
        torch._dynamo.reset()
        with training_step(models, name, ids, attention) as step:
            for _ in range(3):
                step()
            record({"what": f"profile_{case_name(name, attention)}_compiled", **profile_steps(step)})
            record({"what": f"profile-back-to-back_{case_name(name, attention)}_compiled",
                    **profile_steps(step, BACK_TO_BACK_STEPS)})
