"""Ordering the (token, slot) pairs by expert: torch's stable sort against the one-launch Triton sort and the counting
sort (`hf_moe.moe.kernels.sort_by_expert`), at the pair counts of decode, prefill and training.

Per case, in µs per call: `idle` (a call timed alone from an idle GPU: host issue time and GPU time in series, as the
MoE block's forward meets it), `b2b` (back-to-back calls: the larger of host and GPU time per call) and `graph` (the
call replayed from a CUDA graph: GPU time, plus one graph launch). The one-launch kernel's work grows as n², so it
runs up to `--one-launch-max` pairs; `--blocks` adds counting-sort rows with a fixed block of pairs per program.

    python -m benchmarks sort-by-expert                            # E 128 and 8, n from 256 to 262,144
    python -m benchmarks sort-by-expert --pairs 65536,262144 --experts 128 --blocks 256,512,1024,2048,4096
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from hf_moe.moe.experts.grouped import sort_by_expert

from .record import ResultFile
from .timing import cuda_graph_seconds, median_and_min, ms_per_call


def _case(fn: Callable[[], object], reps: int) -> dict:
    idle, _ = median_and_min(fn, "cuda", reps)
    b2b = ms_per_call(fn, reps, "cuda")
    try:
        graph = cuda_graph_seconds(fn, reps) * 1e6
    except Exception as e:  # noqa: BLE001 - report why a variant cannot be captured
        graph = repr(e)[:80]
        torch.cuda.synchronize()
    return {"idle_us": idle * 1e6, "b2b_us": b2b * 1e3, "graph_us": graph}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="256,1024,2048,4096,8192,16384,65536,262144", help="comma list of T·k")
    ap.add_argument("--experts", default="128,8", help="comma list of E")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--one-launch-max", type=int, default=16384, help="largest n for the one-launch kernel")
    ap.add_argument("--blocks", default="", help="comma list of counting-sort block sizes to add (default: auto only)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from hf_moe.moe.kernels import sort_by_expert as kernels

    blocks = [int(b) for b in a.blocks.split(",") if b]
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    print("| E | T·k | torch idle / b2b / graph µs | one launch | counting (auto block) | "
          + " | ".join(f"counting, block {b}" for b in blocks) + " |")
    print("| --- | --- | --- | --- | --- |" + " --- |" * len(blocks))
    with ResultFile(__name__, a.out) as results:
        for num_experts in (int(e) for e in a.experts.split(",")):
            for num_pairs in (int(n) for n in a.pairs.split(",")):
                top_k = min(a.top_k, num_pairs)
                gen = torch.Generator(device="cuda").manual_seed(num_pairs)
                ids = torch.randint(0, num_experts, (num_pairs // top_k, top_k), device="cuda", generator=gen)
                variants = {"torch": lambda: sort_by_expert(ids, num_experts, triton=False),
                            "counting": lambda: kernels.counting_sort_by_expert(ids, num_experts)}
                if num_pairs <= a.one_launch_max:
                    variants["one_launch"] = lambda: kernels.sort_by_expert(ids, num_experts)
                for b in blocks:
                    variants[f"counting_{b}"] = lambda b=b: kernels.counting_sort_by_expert(ids, num_experts, None, b)
                want = variants["torch"]()
                row = {"experts": num_experts, "pairs": num_pairs}
                for name, fn in variants.items():
                    if not all(torch.equal(x, y) for x, y in zip(fn(), want)):
                        row[name] = {"error": "outputs differ from torch's sort"}
                        continue
                    row[name] = _case(fn, a.reps)
                results.write(row)

                def cell(name: str) -> str:
                    r = row.get(name)
                    if r is None or "error" in r:
                        return "-" if r is None else r["error"]
                    graph = f"{r['graph_us']:.1f}" if isinstance(r["graph_us"], float) else "no graph"
                    return f"{r['idle_us']:.1f} / {r['b2b_us']:.1f} / {graph}"

                cells = ["torch", "one_launch", "counting", *(f"counting_{b}" for b in blocks)]
                print(f"| {num_experts} | {num_pairs} | " + " | ".join(cell(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
