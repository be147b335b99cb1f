"""Each grouped GEMM of the experts' training step: hf-moe's Triton kernels against torch's grouped GEMM, in one run.

For each shape it builds the step's operands on one routing (rows sorted by expert) and times, side by side:
forward gate/up (hf-moe: fused with SwiGLU and the routing weight; torch: `grouped_mm` plus hf-moe's SwiGLU kernel),
forward down, the two input-gradient GEMMs, and the two weight-gradient GEMMs (torch's only: hf-moe has no kernel
of its own there). It prints milliseconds, TFLOP/s and the torch / hf-moe ratio, and checks that both agree.
With `--step` it times instead the experts' whole eager training step (`hf_moe_grouped`, forward and
forward+backward) with the Triton GEMMs forced on and off, interleaved round by round on one routing: the number
that decides where `hf_moe_grouped` uses them (`_own_gemm`). With `--block` it times the whole MoE block's training
step the same way, eagerly and replayed from CUDA graphs captured under each choice. GPU with TMA (Hopper or newer)
only.

    python -m benchmarks grouped-gemms                       # Qwen3-30B-A3B, DeepSeek-V3, Mixtral shapes
    python -m benchmarks grouped-gemms --shapes qwen3 --tokens 4096,8192,16384
    python -m benchmarks grouped-gemms --step --shapes qwen3,dsv3 --tokens 1024,2048,4096,8192
    python -m benchmarks grouped-gemms --block --shapes qwen3 --tokens 4096,8192
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import transformers

from hf_moe import capture_moe_cuda_graphs
from hf_moe.moe.experts import grouped_experts_forward
from hf_moe.moe.experts.plan import override_plan

from .layer import build_blocks
from .record import ResultFile
from .timing import interleaved_ms, ratio, triton_ms

SHAPES = {  # name: (hidden, moe_intermediate, experts, top_k, default tokens)
    "qwen3": (2048, 768, 128, 8, 8192),
    "dsv3": (7168, 2048, 256, 8, 4096),
    "mixtral": (4096, 14336, 8, 2, 8192),
}
torch_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def run_shape(name: str, tokens: int) -> list[dict]:
    from hf_moe.moe.kernels import grouped_gemm, swiglu  # Triton: imported once the options are read

    hidden, inter, num_experts, top_k, _ = SHAPES[name]
    rows = tokens * top_k
    expert = torch.rand(tokens, num_experts, device="cuda").topk(top_k, dim=-1).indices.reshape(-1)
    offsets = torch.bincount(expert, minlength=num_experts).cumsum(0).to(torch.int32)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, hidden, **bf16)
    weight = torch.rand(rows, device="cuda")
    gate_up_proj = torch.randn(num_experts, 2 * inter, hidden, **bf16) / hidden**0.5
    down_proj = torch.randn(num_experts, hidden, inter, **bf16) / inter**0.5
    act = torch.randn(rows, inter, **bf16)
    grad_y = torch.randn(rows, hidden, **bf16)
    grad_gate_up = torch.randn(rows, 2 * inter, **bf16)

    def torch_gate_up():
        gate_up = torch_grouped_mm(x, gate_up_proj.transpose(1, 2), offs=offsets)
        return swiglu.swiglu_forward(gate_up, weight, offsets)

    cases = {  # name: (hf-moe, torch, multiply-adds)
        "forward gate/up (+SwiGLU)": (
            lambda: grouped_gemm.gate_up_swiglu(x, gate_up_proj, weight, offsets)[1], torch_gate_up,
            rows * hidden * 2 * inter,
        ),
        "forward down": (
            lambda: grouped_gemm.grouped_mm(act, down_proj.transpose(1, 2), offsets),
            lambda: torch_grouped_mm(act, down_proj.transpose(1, 2), offs=offsets), rows * inter * hidden,
        ),
        "input grad, down": (
            lambda: grouped_gemm.grouped_mm(grad_y, down_proj, offsets),
            lambda: torch_grouped_mm(grad_y, down_proj, offs=offsets), rows * hidden * inter,
        ),
        "input grad, gate/up": (
            lambda: grouped_gemm.grouped_mm(grad_gate_up, gate_up_proj, offsets),
            lambda: torch_grouped_mm(grad_gate_up, gate_up_proj, offs=offsets), rows * 2 * inter * hidden,
        ),
        "weight grad, down": (None, lambda: torch_grouped_mm(grad_y.t(), act, offs=offsets), rows * hidden * inter),
        "weight grad, gate/up": (
            None, lambda: torch_grouped_mm(grad_gate_up.t(), x, offs=offsets), rows * 2 * inter * hidden,
        ),
    }
    num_valid = int(offsets[-1])
    results = []
    for gemm, (ours, theirs, macs) in cases.items():
        tflop = 2 * macs / 1e12
        row = {"shape": name, "tokens": tokens, "rows_per_expert": rows / num_experts, "gemm": gemm}
        row["torch_ms"] = triton_ms(theirs)
        row["torch_tflops"] = tflop / row["torch_ms"] * 1e3
        if ours is not None:
            row["rel_err_vs_torch"] = rel_err(ours()[:num_valid], theirs()[:num_valid])
            row["hf_moe_ms"] = triton_ms(ours)
            row["hf_moe_tflops"] = tflop / row["hf_moe_ms"] * 1e3
            row["torch_over_hf_moe"] = row["torch_ms"] / row["hf_moe_ms"]
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


@contextmanager
def own_gemms(enabled: bool) -> Iterator[None]:
    """Force `hf_moe_grouped`'s choice of GEMMs: the Triton ones wherever they run, or torch's everywhere."""
    forced = {"own_gemm_rows_per_expert": 2**62, "own_gemm_min_multiply_adds": 0} if enabled else {
        "own_gemm_rows_per_expert": 0, "own_gemm_min_multiply_adds": 2**62}
    with override_plan(**forced):
        yield


def ab_rows(
    name: str, tokens: int, rounds: int,
    cases: list[tuple[str, Callable[[], object], Callable[[bool], AbstractContextManager], int]],
) -> list[dict]:
    """For each (step, fn, variant, passes): `fn` timed inside `variant(True)` (the Triton GEMMs) and `variant(False)`
    (torch's), interleaved; `passes` is 1 for a forward, 3 for forward+backward (the TFLOP/s count)."""
    hidden, inter, num_experts, top_k, _ = SHAPES[name]
    results = []
    for step, fn, variant, passes in cases:
        own_ms, torch_ms = interleaved_ms(fn, variant, rounds)
        row = {"shape": name, "tokens": tokens, "rows_per_expert": tokens * top_k / num_experts, "step": step,
               "own_gemms_ms": own_ms, "torch_gemms_ms": torch_ms, "torch_over_own": torch_ms / own_ms,
               "own_tflops": passes * 2 * tokens * top_k * 3 * hidden * inter / own_ms / 1e9}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def run_step(name: str, tokens: int, rounds: int = 10) -> list[dict]:
    """The experts' eager step (router-chosen routing of random weights) with and without the Triton GEMMs."""
    hidden, inter, num_experts, top_k, _ = SHAPES[name]
    block, _ = build_blocks((hidden, inter, num_experts, top_k), "cuda", torch.bfloat16)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        routing = block.router(x)
    index, weights = routing.top_k_index, routing.top_k_weights.detach().requires_grad_(True)
    grad_out = torch.randn_like(x)
    leaves = [x, weights, *block.experts.parameters()]

    def forward():
        with torch.no_grad():
            grouped_experts_forward(block.experts, x, index, weights)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        grouped_experts_forward(block.experts, x, index, weights).backward(grad_out)

    return ab_rows(name, tokens, rounds, [
        ("forward", forward, own_gemms, 1), ("forward+backward", forward_backward, own_gemms, 3),
    ])


def run_block(name: str, tokens: int, rounds: int = 10) -> list[dict]:
    """The MoE block's training step with and without the Triton GEMMs, eager and in CUDA graphs (one capture per
    choice, swapped in round by round)."""
    hidden, inter, num_experts, top_k, _ = SHAPES[name]
    block, _ = build_blocks((hidden, inter, num_experts, top_k), "cuda", torch.bfloat16)
    x = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(x)
    leaves = [x, *block.parameters()]
    graphs = {}
    for enabled in (True, False):
        with own_gemms(enabled):
            capture_moe_cuda_graphs(block, 1, tokens)
        graphs[enabled] = block.cuda_graphs
        block.set_cuda_graphs(None)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        block(x).backward(grad_out)

    @contextmanager
    def graphed(enabled: bool) -> Iterator[None]:
        block.set_cuda_graphs(graphs[enabled])
        try:
            with own_gemms(enabled):
                yield
        finally:
            block.set_cuda_graphs(None)

    return ab_rows(name, tokens, rounds, [
        ("block fwd+bwd, eager", forward_backward, own_gemms, 3),
        ("block fwd+bwd, CUDA graphs", forward_backward, graphed, 3),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3,dsv3,mixtral", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--tokens", default=None, help="comma list of token counts (default: one per shape)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--step", action="store_true", help="the experts' whole step with and without the Triton GEMMs")
    mode.add_argument("--block", action="store_true", help="the MoE block's step, eager and graphed, the same way")
    ap.add_argument("--out", default=None, help="append the rows to this JSONL file (default: benchmarks/results/)")
    a = ap.parse_args()
    import triton

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__}
    print(json.dumps(env))
    torch.manual_seed(0)
    results = []
    with ResultFile(__name__, a.out) as out:
        out.write({"what": "env", **env})
        for name in a.shapes.split(","):
            for tokens in [int(t) for t in a.tokens.split(",")] if a.tokens else [SHAPES[name][4]]:
                if a.block:
                    rows = run_block(name, tokens)
                else:
                    rows = run_step(name, tokens) if a.step else run_shape(name, tokens)
                for row in rows:
                    out.write(row)
                results += rows
                torch.cuda.empty_cache()
        print_tables(a, results)


def print_tables(a: argparse.Namespace, results: list[dict]) -> None:
    if a.block:
        print("\n| shape | T | rows/expert | step | Triton GEMMs ms (TFLOP/s) | torch's GEMMs ms | torch's / Triton |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(f"| {r['shape']} | {r['tokens']} | {r['rows_per_expert']:.0f} | {r['step']} | "
                  f"{r['own_gemms_ms']:.3f} ({r['own_tflops']:.0f}) | {r['torch_gemms_ms']:.3f} | "
                  f"{ratio(r['torch_gemms_ms'], r['own_gemms_ms'])} |")
        return
    if a.step:
        print("\n| shape | T | rows/expert | experts step | Triton GEMMs ms | torch's GEMMs ms | torch's / Triton |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            print(f"| {r['shape']} | {r['tokens']} | {r['rows_per_expert']:.0f} | {r['step']} | "
                  f"{r['own_gemms_ms']:.3f} | {r['torch_gemms_ms']:.3f} | {ratio(r['torch_gemms_ms'], r['own_gemms_ms'])} |")
        return
    print("\n| shape | T | rows/expert | GEMM | torch ms (TFLOP/s) | hf-moe ms (TFLOP/s) | torch / hf-moe |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ours = f"{r['hf_moe_ms']:.3f} ({r['hf_moe_tflops']:.0f})" if "hf_moe_ms" in r else "(torch's)"
        factor = ratio(r["torch_ms"], r["hf_moe_ms"]) if "hf_moe_ms" in r else "-"
        print(f"| {r['shape']} | {r['tokens']} | {r['rows_per_expert']:.0f} | {r['gemm']} | "
              f"{r['torch_ms']:.3f} ({r['torch_tflops']:.0f}) | {ours} | {factor} |")


if __name__ == "__main__":
    main()
