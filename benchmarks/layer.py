"""MoE layer benchmark: hf-moe's MoE block against transformers' `Qwen3MoeSparseMoeBlock`, in one run.

Both blocks share the same expert and router weights. For each shape, token count and routing it prints the
time, the TFLOP/s of active expert FLOPs (2·T·k·3·H·I forward, three times that forward+backward), the
activation memory the forward keeps for backward and the peak memory of forward+backward (per token), and the
hf-moe / peer ratios; each call is timed from an idle GPU, and on a GPU forward+backward is also timed back to back
(`fwdbwd_b2b_*`: the host issues the next call while the GPU runs the last, as for the layers of a model); on a GPU
hf-moe's block also runs with torch's sort by expert instead of the counting sort (`hf-moe_torch_sort`); plus the
dense-equivalent GEMM (one `[T·k, H] @ [H, 3I]` product) as the ceiling, and decode (T = 64, forward only) against
the HBM floor = bytes of the experts touched / measured copy bandwidth.

    python -m benchmarks layer                 # GPU: all shapes, T ∈ {4096, 8192, 16384}, three routings
    python -m benchmarks layer --quick         # GPU: T = 8192, uniform routing, and decode
    python -m benchmarks layer --decode-only   # GPU: decode only (T = 64), every shape
    python -m benchmarks layer --device cpu    # CPU: small shape (H 512, I 1024, E 16, k 2), T 1024, fp32
    python -m benchmarks layer --accumulate    # backward adds into existing `.grad` (gradient accumulation)

With liger-kernel installed (`pip install "hf-moe[liger]"`), the GPU run adds Liger-Kernel's fused MoE
(`liger_fused`, its first call per shape autotunes) as the experts of hf-moe's block and alone on the same routing.

Routing: `uniform` is the router itself (random weights, close to uniform), `balanced` forces every expert to
receive exactly T·k/E slots, `skewed` draws each token's experts from a Zipf(1.2) law over the experts. Forced
routings replace only the chosen indices; the routing weights still come from each block's router.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable

import torch
import transformers
from transformers.integrations.moe import grouped_mm_experts_forward

import hf_moe
from hf_moe import capture_moe_cuda_graphs
from hf_moe.moe.experts import LIGER_AVAILABLE, grouped_experts_forward, liger_fused_experts_forward
from hf_moe.moe.experts.plan import override_plan
from hf_moe.moe.kernels import quack_gemm

from .layer_blocks import HF_IMPL, LIGER_IMPL, PEER_IMPLS, SHAPES, build_blocks, forced_routing, run_block, set_routing
from .layer_report import print_summary
from .record import ResultFile
from .timing import cuda_graph_seconds, median_and_min, ms_per_call


def ceilings(device: str, dtype: torch.dtype) -> dict:
    """Dense 8192³ GEMM rate and device-to-device copy bandwidth (bytes read + written)."""
    if device != "cuda":
        return {}
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t_mm, _ = median_and_min(lambda: a @ b, device, reps=10)
    del a, b
    src = torch.randn(2**30 // 2, device=device, dtype=dtype)  # 1 GiB
    dst = torch.empty_like(src)
    t_copy, _ = median_and_min(lambda: dst.copy_(src), device, reps=10)
    out = {"dense_gemm_tflops": 2 * n**3 / t_mm / 1e12, "copy_gbps": 2 * src.numel() * src.element_size() / t_copy / 1e9}
    del src, dst
    torch.cuda.empty_cache()
    return out


def measure(call: Callable[[], torch.Tensor], leaves: list[torch.Tensor], flops: float, num_tokens: int,
            device: str, reps: int, accumulate: bool = False) -> dict:
    """Forward (no grad) and forward+backward of `call`, and on GPU the memory it keeps and peaks at. Backward
    starts from a fixed random output gradient, so no loss computation is timed (the same for every
    implementation). `accumulate`: every backward adds into the leaves' existing `.grad` (gradient accumulation),
    which then count in the baseline of the peak, as the parameters do."""
    with torch.no_grad():
        grad_out = torch.randn_like(call())

    def fwd():
        with torch.no_grad():
            call()

    def fwd_bwd():
        if not accumulate:
            for p in leaves:
                p.grad = None
        call().backward(grad_out)

    row = {}
    t_fwd, t_fwd_min = median_and_min(fwd, device, reps)
    t_fb, t_fb_min = median_and_min(fwd_bwd, device, reps)
    row.update(fwd_ms=t_fwd * 1e3, fwd_tflops=flops / t_fwd / 1e12, fwdbwd_ms=t_fb * 1e3,
               fwdbwd_tflops=3 * flops / t_fb / 1e12)
    if device == "cpu":
        row.update(fwd_min_ms=t_fwd_min * 1e3, fwdbwd_min_ms=t_fb_min * 1e3)
    else:
        # back to back, as a layer runs inside a model: the host issues the next call while the GPU works
        b2b_ms = ms_per_call(fwd_bwd, max(reps, 10), device)
        row.update(fwdbwd_b2b_ms=b2b_ms, fwdbwd_b2b_tflops=3 * flops / b2b_ms / 1e9)
        for p in leaves:
            p.grad = None
        if accumulate:
            call().backward(grad_out)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = call()
        saved = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
        out.backward(grad_out)
        peak = torch.cuda.max_memory_allocated() - base
        del out
        for p in leaves:
            p.grad = None
        row.update(act_kb_per_token=saved / num_tokens / 1e3, peak_fwdbwd_gb=peak / 1e9)
    return row


def forward_with(setting: str, value: int, experts, x, index, weights):
    """`hf_moe_grouped`'s forward with one plan setting changed (see `hf_moe.moe.experts.plan.override_plan`):
    `decode_rows_per_expert=0` turns the decode kernels off (the grouped-GEMM path that training runs)."""
    with override_plan(**{setting: value}):
        return grouped_experts_forward(experts, x, index, weights)


def decode(hf_block, peer, shape, tokens: int, device: str, dtype: torch.dtype, copy_gbps: float, reps: int,
           liger: bool) -> list[dict]:
    """Forward of `tokens` tokens (block, and experts alone on the same routing), eager and replayed from a CUDA
    graph, against the HBM floor. Paths that synchronise with the host (the eager loop) are not captured."""
    hidden, inter, experts, top_k = shape
    x = torch.randn(1, tokens, hidden, device=device, dtype=dtype)
    x2d = x.view(-1, hidden)
    with torch.no_grad():
        routing = hf_block.router(x2d)
    index, weights = routing.top_k_index, routing.top_k_weights
    touched = index.unique().numel()
    floor_s = touched * 3 * hidden * inter * torch.finfo(dtype).bits / 8 / (copy_gbps * 1e9)
    cases = [
        ("block_hf-moe", lambda: run_block(hf_block, HF_IMPL, x), True),
        ("block_peer_grouped_mm", lambda: run_block(peer, "grouped_mm", x), True),
        ("block_peer_eager", lambda: run_block(peer, "eager", x), False),
        ("experts_hf-moe", lambda: grouped_experts_forward(hf_block.experts, x2d, index, weights), True),
        ("experts_hf-moe_grouped_gemms",
         lambda: forward_with("decode_rows_per_expert", 0, hf_block.experts, x2d, index, weights), True),
        ("experts_peer_grouped_mm", lambda: grouped_mm_experts_forward(peer.experts, x2d, index, weights), True),
    ]
    if liger:  # one host sync per call (its tile count): not capturable
        cases.append(("experts_liger", lambda: liger_fused_experts_forward(hf_block.experts, x2d, index, weights), False))
    rows = []
    with torch.no_grad():
        for name, fn, capturable in cases:
            try:
                t, _ = median_and_min(fn, device, reps)
            except Exception as e:  # noqa: BLE001 - e.g. an optional dependency that fails to load
                rows.append({"what": f"decode_{name}", "error": repr(e)[:300]})
                continue
            r = {"what": f"decode_{name}", "ms": t * 1e3, "floor_ms": floor_s * 1e3, "x_floor": t / floor_s}
            if capturable:
                try:
                    tg = cuda_graph_seconds(fn, reps)
                    r.update(graph_ms=tg * 1e3, graph_x_floor=tg / floor_s)
                except Exception as e:  # noqa: BLE001 - report why a block cannot be captured
                    r["graph_error"] = repr(e)[:100]
                    torch.cuda.synchronize()
            rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--tokens", default=None, help="comma list of token counts")
    ap.add_argument("--routings", default=None, help="comma list of uniform, balanced, skewed")
    ap.add_argument("--quick", action="store_true", help="T=8192, uniform routing, decode")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="only the decode cases (GPU)")
    ap.add_argument("--eager-shapes", default="mixtral,qwen3,small",
                    help="shapes that also time transformers' eager loop (DSV3's takes minutes at ~1 TFLOP/s)")
    ap.add_argument("--liger-shapes", default="mixtral,qwen3",
                    help="shapes that also time liger_fused when liger-kernel is installed (GPU; autotunes per shape)")
    ap.add_argument("--accumulate", action="store_true",
                    help="keep .grad between backward passes (gradient accumulation), for hf-moe and the peers alike; "
                         "cases are keyed <shape>_T<tokens>_<routing>_accumulate")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None,
                    help="append JSON lines here (default: a new benchmarks/results/layer-<UTC time>.jsonl)")
    a = ap.parse_args()
    device = a.device
    cpu = device == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    shapes = (a.shapes or ("small" if cpu else "mixtral,qwen3,dsv3")).split(",")
    routings = (a.routings or ("uniform" if a.quick or cpu else "uniform,balanced,skewed")).split(",")
    reps = a.reps or (20 if cpu else 10)
    env = {
        "device": torch.cuda.get_device_name() if not cpu else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__, "hf_moe": hf_moe.__version__,
        "dtype": str(dtype).replace("torch.", ""),
    }
    env.update(ceilings(device, dtype))
    print(json.dumps(env))
    timed = functools.partial(measure, accumulate=a.accumulate)
    out_file = ResultFile(__name__, a.out)  # rows are written as they are measured

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        out_file.write(row)

    emit(dict(what="env", **env))
    summary = []
    started = time.perf_counter()
    for name in shapes:
        shape = SHAPES[name]
        hidden, inter, experts, top_k = shape
        hf_block, peer = build_blocks(shape, device, dtype)
        with_liger = not cpu and LIGER_AVAILABLE and name in a.liger_shapes.split(",")
        if a.tokens:
            token_list = [int(t) for t in a.tokens.split(",")]
        elif cpu:
            token_list = [1024]
        elif a.quick:
            token_list = [4096 if name == "dsv3" else 8192]
        elif name == "dsv3":
            token_list = [2048, 4096]
        else:
            token_list = [4096, 8192, 16384] + ([32768] if name == "qwen3" else [])
        for tokens in [] if a.decode_only else token_list:
            flops = 2 * tokens * top_k * 3 * hidden * inter
            act = torch.randn(tokens * top_k, hidden, device=device, dtype=dtype)
            w = torch.randn(hidden, 3 * inter, device=device, dtype=dtype)
            t_dense, _ = median_and_min(lambda: act @ w, device, reps)
            dense = flops / t_dense / 1e12
            del act, w
            for routing_kind in routings:
                index = forced_routing(routing_kind, tokens, experts, top_k, device)
                set_routing(hf_block, peer, index)
                x = torch.randn(1, tokens, hidden, device=device, dtype=dtype, requires_grad=True)
                x2d = x.detach().view(-1, hidden).requires_grad_(True)
                with torch.no_grad():
                    routing = hf_block.router(x2d)
                top_index = routing.top_k_index if index is None else index
                top_weights = routing.top_k_weights.detach().requires_grad_(True)
                key = f"{name}_T{tokens}_{routing_kind}" + ("_accumulate" if a.accumulate else "")
                hf_leaves = [x, *hf_block.parameters()]
                expert_leaves = [x2d, top_weights, *hf_block.experts.parameters()]
                res = {
                    "hf-moe": timed(lambda: run_block(hf_block, HF_IMPL, x), hf_leaves, flops, tokens, device, reps),
                    "experts_hf-moe": timed(
                        lambda: grouped_experts_forward(hf_block.experts, x2d, top_index, top_weights),
                        expert_leaves, flops, tokens, device, reps,
                    ),
                    "experts_peer_grouped_mm": timed(
                        lambda: grouped_mm_experts_forward(peer.experts, x2d, top_index, top_weights),
                        expert_leaves, flops, tokens, device, reps,
                    ),
                }
                if not cpu:  # the same path on torch's grouped GEMMs, forward and backward
                    with override_plan(own_gemm_rows_per_expert=0):
                        res["experts_hf-moe_torch_gemms"] = timed(
                            lambda: grouped_experts_forward(hf_block.experts, x2d, top_index, top_weights),
                            expert_leaves, flops, tokens, device, reps,
                        )
                if not cpu:  # the block with torch's sort by expert instead of the counting sort
                    with override_plan(counting_sort=False):
                        res["hf-moe_torch_sort"] = timed(
                            lambda: run_block(hf_block, HF_IMPL, x), hf_leaves, flops, tokens, device, reps
                        )
                if not cpu and quack_gemm.available():  # the block with torch's grouped GEMM for weight gradients
                    with override_plan(quack=False):
                        res["hf-moe_without_quack"] = timed(
                            lambda: run_block(hf_block, HF_IMPL, x), hf_leaves, flops, tokens, device, reps
                        )
                if not cpu and routing_kind == "uniform":  # the block's training step replayed from CUDA graphs
                    try:
                        capture_moe_cuda_graphs(hf_block, 1, tokens)
                        res["hf-moe_graphed"] = timed(
                            lambda: run_block(hf_block, HF_IMPL, x), hf_leaves, flops, tokens, device, reps
                        )
                    except Exception as e:  # noqa: BLE001
                        res["hf-moe_graphed"] = {"error": repr(e)[:300]}
                    finally:
                        hf_block.set_cuda_graphs(None)
                if with_liger:
                    try:  # an optional dependency: report its failure and go on with the rest
                        res["liger"] = timed(
                            lambda: run_block(hf_block, LIGER_IMPL, x), hf_leaves, flops, tokens, device, reps
                        )
                        res["experts_liger"] = timed(
                            lambda: liger_fused_experts_forward(hf_block.experts, x2d, top_index, top_weights),
                            expert_leaves, flops, tokens, device, reps,
                        )
                    except Exception as e:  # noqa: BLE001
                        res["liger"] = res["experts_liger"] = {"error": repr(e)[:300]}
                        torch.cuda.synchronize()
                for impl in PEER_IMPLS:
                    slow = routing_kind != "uniform" or tokens > (1024 if cpu else 8192)
                    if impl == "eager" and (slow or name not in a.eager_shapes.split(",")):
                        continue  # the eager loop is slow; one case per shape is enough
                    try:
                        res[f"peer_{impl}"] = timed(
                            lambda: run_block(peer, impl, x), [x, *peer.parameters()], flops, tokens, device, reps
                        )
                    except torch.OutOfMemoryError:
                        res[f"peer_{impl}"] = {"error": "out of memory"}
                        torch.cuda.empty_cache()
                for who, r in res.items():
                    emit({"what": f"{key}_{who}", "dense_equiv_tflops": dense, **r})
                summary.append((key, dense, res))
                del x, x2d
        set_routing(hf_block, peer, None)
        if not cpu and not a.no_decode and name != "small":
            for r in decode(hf_block, peer, shape, 64, device, dtype, env["copy_gbps"], max(reps, 20), with_liger):
                r["what"] = f"{name}_{r['what']}"
                emit(r)
                summary.append((r["what"], None, r))
        emit({"what": f"{name}_elapsed", "seconds": time.perf_counter() - started})
        del hf_block, peer
        if not cpu:
            torch.cuda.empty_cache()
    print_summary(summary, cpu)
    out_file.close()


if __name__ == "__main__":
    main()
