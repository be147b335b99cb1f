"""`python -m benchmarks compile --parts capture`: a DeepSeek-V3-shaped block's decode step (H 7168, I 2048, E 256,
k 8, 64 tokens) captured in CUDA graphs piece by piece (router, sort, experts, whole block; global and thread-local
capture mode), with the full error of each capture that fails; in a subprocess, since a failed capture breaks the
process's CUDA graph state (docs/decisions/compile.md, "The DeepSeek-V3 decode capture")."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable

import torch

from .record import error_row
from .timing import capture as capture_graph
from .timing import seconds_per_call

DSV3 = (7168, 2048, 256, 8)  # hidden, moe intermediate, experts, top-k


def capture(record: Callable[[dict], None]) -> None:
    """Capture a DeepSeek-V3-shaped block's decode step, and each of its pieces alone, in CUDA graphs."""
    from hf_moe import HfMoeConfig, HfMoeSparseMoeBlock
    from hf_moe.moe.experts.grouped import grouped_experts_forward, sort_by_expert

    hidden, inter, experts, top_k = DSV3
    cfg = HfMoeConfig(hidden_size=hidden, moe_intermediate_size=inter, intermediate_size=inter, num_experts=experts,
                      num_experts_per_tok=top_k, norm_topk_prob=True, num_hidden_layers=1, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=128)
    cfg._experts_implementation = "hf_moe_grouped"  # a model sets it; a block built alone must be told
    torch.manual_seed(0)
    with torch.device("cuda"):
        block = HfMoeSparseMoeBlock(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(1, 64, hidden, device="cuda", dtype=torch.bfloat16)
    x2d = x.view(-1, hidden)
    with torch.no_grad():
        routing = block.router(x2d)
    pieces = {
        "router": lambda: block.router(x2d),
        "sort_by_expert": lambda: sort_by_expert(routing.top_k_index, experts),
        "experts": lambda: grouped_experts_forward(block.experts, x2d, routing.top_k_index, routing.top_k_weights),
        "block": lambda: block(x),
    }
    def capture_fails_then_block():
        """A capture that fails inside (a host sync), then the block: the failed capture leaves the process's
        capture state broken, so the block's capture fails although nothing in it syncs."""
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                x2d.sum().item()
        except Exception:  # noqa: BLE001 - expected
            pass
        return block(x)

    for mode in ("global", "thread_local"):
        for name, fn in pieces.items():
            what = f"capture_dsv3_decode_{name}_{mode}"
            try:
                with torch.no_grad():
                    eager = fn()
                    graph, captured = capture_graph(fn, mode)
                    graph.replay()
                    torch.cuda.synchronize()
                    first = eager if isinstance(eager, torch.Tensor) else eager[0] if isinstance(eager, tuple) \
                        else eager.top_k_weights
                    again = captured if isinstance(captured, torch.Tensor) else captured[0] \
                        if isinstance(captured, tuple) else captured.top_k_weights
                    row = {"what": what, "ok": True, "replay_ms": seconds_per_call(graph.replay, 20) * 1e3,
                           "eager_ms": seconds_per_call(fn, 20) * 1e3,
                           "replay_equals_eager": bool(torch.equal(first, again))}
                    del graph
            except Exception as e:  # noqa: BLE001 - the point: which piece fails, and why
                row = error_row(what, e)
            record(row)
    # last: it breaks the process's capture state (and the RNG's), which is why `main` runs this part in a subprocess
    what = "capture_dsv3_decode_block_after_a_failed_capture"
    try:
        with torch.no_grad():
            block(x)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                capture_fails_then_block()
        record({"what": what, "ok": True})
    except Exception as e:  # noqa: BLE001
        record(error_row(what, e))
    del block
    gc.collect()
    torch.cuda.empty_cache()


def capture_in_subprocess(record: Callable[[dict], None]) -> None:
    code = ("import json, torch; from benchmarks.compile_capture import capture; "
            "capture(lambda row: print('ROW ' + json.dumps(row), flush=True))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            record(json.loads(line[4:]))
    if done.returncode:
        record({"what": "capture_subprocess", "error": done.stderr[-1500:]})
