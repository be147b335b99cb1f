"""Router host cost: aten ops and host time of one router forward (and forward+backward) at a small shape.

The router's GPU work is tiny; what it costs in eager mode is one dispatcher call (and on CUDA one launch) per aten
op, so this counts the ops that reach the dispatcher (`TorchDispatchMode`: every op, views included; "kernels"
leaves out views and detach) and times back-to-back calls with one synchronisation at the end (host-bound at this
size, so the time is the host's). Backward is run from the router's outputs (`top_k_weights` and `aux_loss`) with
given gradients, so no loss arithmetic is counted.

    python -m benchmarks router-host                  # CPU, T 64, H 256, E 128, k 8, float32 and bf16
    python -m benchmarks router-host --device cuda    # the same on the GPU (host time per call)
    python -m benchmarks router-host --ops            # also list the ops by name
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_moe import HfMoeConfig
from hf_moe.moe.router.registry import build_router

from .record import ResultFile
from .timing import host_us


class OpCounter(TorchDispatchMode):
    """Counts every aten op that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        self.kernels += not (func.is_view or name == "detach")
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--ops", action="store_true", help="list the ops by name")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # the host cost of dispatch, not of thread pools

    config = HfMoeConfig(hidden_size=args.hidden, num_experts=args.experts, num_experts_per_tok=args.top_k,
                         intermediate_size=64, moe_intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4)
    print(f"router T={args.tokens} H={args.hidden} E={args.experts} k={args.top_k} on {args.device}, "
          f"torch {torch.__version__}")
    with ResultFile(__name__) as results:
        for dtype_name in args.dtypes.split(","):
            results.write(measure(args, config, dtype_name))


def measure(args: argparse.Namespace, config: HfMoeConfig, dtype_name: str) -> dict:
    """Ops and host time of one router in `dtype_name`; prints them and returns them as a row."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    router = build_router(config, 0)
    router.initialize(0.02)
    router = router.to(args.device, dtype).train()
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
    grad_weights = torch.randn(args.tokens, args.top_k, device=args.device, dtype=dtype)
    grad_aux = torch.ones((), device=args.device)

    def forward():
        return router(x)

    def forward_backward():
        out = router(x)
        torch.autograd.backward((out.top_k_weights, out.aux_loss), (grad_weights, grad_aux))

    forward_backward()  # warm up (lazy inits) outside the counters
    with OpCounter() as fwd_ops:
        out = forward()
    with OpCounter() as bwd_ops:
        torch.autograd.backward((out.top_k_weights, out.aux_loss), (grad_weights, grad_aux))
    fwd_us = host_us(forward, args.device, args.calls, args.repeats)
    fwd_bwd_us = host_us(forward_backward, args.device, args.calls // 2, args.repeats)
    print(f"{dtype_name:>9}: forward {sum(fwd_ops.ops.values())} ops ({fwd_ops.kernels} kernels), "
          f"backward {sum(bwd_ops.ops.values())} ops ({bwd_ops.kernels} kernels); host µs per call, median (min): "
          f"forward {fwd_us[0]:.0f} ({fwd_us[1]:.0f}), forward+backward {fwd_bwd_us[0]:.0f} ({fwd_bwd_us[1]:.0f})")
    if args.ops:
        print("    forward:", dict(fwd_ops.ops))
        print("    backward:", dict(bwd_ops.ops))
    return {"tokens": args.tokens, "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k,
            "device": args.device, "torch": torch.__version__, "dtype": dtype_name,
            "forward_ops": sum(fwd_ops.ops.values()), "forward_kernels": fwd_ops.kernels,
            "backward_ops": sum(bwd_ops.ops.values()), "backward_kernels": bwd_ops.kernels,
            "forward_host_us_median": fwd_us[0], "forward_host_us_min": fwd_us[1],
            "forward_backward_host_us_median": fwd_bwd_us[0], "forward_backward_host_us_min": fwd_bwd_us[1]}


if __name__ == "__main__":
    main()
