"""torch.compile against eager, hf-moe against transformers' Qwen3-MoE on the same weights (GPU, bf16).

A Qwen3-30B-A3B-shaped model with a few layers (H 2048, I 768, E 128, k 8, 32 heads, 4 KV heads, head_dim 128,
vocabulary 32k), the same weights in transformers' `Qwen3MoeForCausalLM` (grouped_mm experts) and in
`HfMoeForCausalLM`:

- `train`: forward + backward of 4 × 2048 tokens, eager and `torch.compile(model)`, tokens/s, first-call (compile)
  seconds, peak memory;
- `generate`: 128 new tokens (greedy), dynamic cache eager and static cache compiled, at batch 16 and 1;
- `capture`: a DeepSeek-V3-shaped block (H 7168, I 2048, E 256, k 8) at 64 decode tokens captured in a CUDA graph
  piece by piece (router, sort, experts, whole block, in global and thread-local capture mode), with the full error
  of each capture that fails.

    python -m benchmarks compile                      # every part, stops starting parts after --budget-s
    python -m benchmarks compile --parts capture      # one part

Prints one line per measurement and a summary table; rows go to benchmarks/results/compile-<time>.jsonl, or to
`--out` (a .jsonl path).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import torch

from .record import ResultFile
from .timing import median_and_min, synchronize

QWEN3 = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
             num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=32000,
             norm_topk_prob=True, max_position_embeddings=4096)
TINY = dict(QWEN3, hidden_size=64, moe_intermediate_size=32, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)  # --tiny: a CPU smoke run
DSV3 = (7168, 2048, 256, 8)  # hidden, moe intermediate, experts, top-k


def build_models(shape: dict, layers: int, device: str):
    """transformers' Qwen3-MoE and hf-moe's model, bf16, sharing no storage but holding equal weights."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from hf_moe import HfMoeConfig, HfMoeForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        peer = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, num_hidden_layers=layers)).to(torch.bfloat16)
        ours = HfMoeForCausalLM(HfMoeConfig(**shape, num_hidden_layers=layers, qk_norm=True)).to(torch.bfloat16)
    state = {k.replace(".mlp.gate.", ".mlp.router."): v for k, v in peer.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=True)
    assert not missing and not unexpected, (missing, unexpected)
    return {"hf-moe": ours, "transformers": peer}


def seconds_per_call(fn, reps: int, device: str = "cuda") -> float:
    """Median device seconds of `fn` over `reps` calls, each timed alone."""
    return median_and_min(fn, device, reps, warmup=0)[0]


def first_call_seconds(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def error_row(what: str, e: BaseException) -> dict:
    """The error and the one it replaced, if any: a capture that fails inside reports CUDA's "operation failed due
    to a previous error during capture" from `capture_end`, which hides the error that invalidated the capture."""
    try:
        synchronize("cuda" if torch.cuda.is_available() else "cpu")
    except Exception:  # noqa: BLE001 - a failed capture may leave an error behind
        pass
    row = {"what": what, "error": f"{type(e).__name__}: {e}"[:300],
           "where": "".join(traceback.format_tb(e.__traceback__)[-2:])[-500:]}
    cause = e.__cause__ or e.__context__
    if cause is not None:
        row["cause"] = f"{type(cause).__name__}: {cause}"[:400]
        row["cause_where"] = "".join(traceback.format_tb(cause.__traceback__)[-3:])[-900:]
    return row


def train(models: dict, reps: int, seq: int, device: str, record: Callable[[dict], None],
          modes: tuple[str, ...] = ("eager", "compiled")) -> None:
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (4, seq), device=device, generator=torch.Generator(device).manual_seed(1))
    for name, model in models.items():
        model.train()
        for mode in modes:
            what = f"train_{name}_{mode}"
            run = torch.compile(model) if mode == "compiled" else model

            def step():
                run(input_ids=ids, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)

            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                first = first_call_seconds(step, device)
                step()
                seconds = seconds_per_call(step, reps, device)
                row = {"what": what, "tokens_per_s": ids.numel() / seconds, "ms": seconds * 1e3, "first_call_s": first}
                if device == "cuda":
                    row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            except Exception as e:  # noqa: BLE001 - report and go on with the other cases
                row = error_row(what, e)
            record(row)
            del run
            torch._dynamo.reset()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        model.eval()


def generate(models: dict, new_tokens: int, device: str, record: Callable[[dict], None],
             batches: tuple[int, ...] = (16, 1)) -> None:
    vocab = next(iter(models.values())).config.vocab_size
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, 64), device=device, generator=torch.Generator(device).manual_seed(2))
        for name, model in models.items():
            model.eval()
            for cache in ("dynamic", "static"):
                what = f"generate_bs{batch}_{name}_{cache}"
                kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)
                if cache == "static":
                    kwargs["cache_implementation"] = "static"  # transformers compiles the decode step on CUDA
                try:  # the first call compiles (static) or warms up: a short one for the dynamic cache
                    first = first_call_seconds(lambda: model.generate(
                        ids, **{**kwargs, **({} if cache == "static" else dict(max_new_tokens=4, min_new_tokens=4))}),
                        device)
                    seconds = seconds_per_call(lambda: model.generate(ids, **kwargs), 1, device)
                    row = {"what": what, "tokens_per_s": batch * new_tokens / seconds, "s": seconds,
                           "first_call_s": first, "compiled": "_compiled_call" in model.__dict__}
                except Exception as e:  # noqa: BLE001
                    row = error_row(what, e)
                record(row)
            model.__dict__.pop("_compiled_call", None)
            torch._dynamo.reset()


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
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        for _ in range(3):
                            fn()
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, capture_error_mode=mode):
                        captured = fn()
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
    code = ("import json, torch; from benchmarks.compile import capture; "
            "capture(lambda row: print('ROW ' + json.dumps(row), flush=True))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            record(json.loads(line[4:]))
    if done.returncode:
        record({"what": "capture_subprocess", "error": done.stderr[-1500:]})


def summary(rows: list[dict]) -> None:
    by = {r["what"]: r for r in rows}

    def tps(key):
        return by.get(key, {}).get("tokens_per_s")

    print("\n| case | eager tok/s | compiled tok/s | compiled / eager |")
    print("| --- | --- | --- | --- |")
    for name in ("transformers", "hf-moe"):
        e, c = tps(f"train_{name}_eager"), tps(f"train_{name}_compiled")
        print(f"| train {name} | {e and round(e)} | {c and round(c)} | {e and c and round(c / e, 3)} |")
    for batch in (16, 1):
        for name in ("transformers", "hf-moe"):
            e, c = tps(f"generate_bs{batch}_{name}_dynamic"), tps(f"generate_bs{batch}_{name}_static")
            print(f"| generate bs{batch} {name} (dynamic eager / static compiled) | {e and round(e, 1)} | "
                  f"{c and round(c, 1)} | {e and c and round(c / e, 3)} |")
    pairs = [("train compiled", "train_hf-moe_compiled", "train_transformers_compiled"),
             ("train eager", "train_hf-moe_eager", "train_transformers_eager"),
             ("generate bs16 static", "generate_bs16_hf-moe_static", "generate_bs16_transformers_static"),
             ("generate bs1 static", "generate_bs1_hf-moe_static", "generate_bs1_transformers_static"),
             ("generate bs1 eager", "generate_bs1_hf-moe_dynamic", "generate_bs1_transformers_dynamic")]
    for label, ours, theirs in pairs:
        a, b = tps(ours), tps(theirs)
        print(f"hf-moe / transformers, {label}: {a and b and round(a / b, 3)}")
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['what']}: {r['error']}\n{r.get('where', '')}")
            if "cause" in r:
                print(f"  CAUSED BY {r['cause']}\n{r['cause_where']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="capture,train,generate", help="comma list of capture, train, generate")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=2048, help="training sequence length (batch 4)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no part after this many seconds")
    ap.add_argument("--models", default="hf-moe,transformers", help="comma list of hf-moe, transformers")
    ap.add_argument("--modes", default="eager,compiled", help="training modes: comma list of eager, compiled")
    ap.add_argument("--batches", default="16,1", help="generate batch sizes")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (a smoke run of train, generate)")
    ap.add_argument("--out", default=None, help="results .jsonl (default: benchmarks/results/compile-<time>.jsonl)")
    a = ap.parse_args()
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m benchmarks compile needs a CUDA device (or --tiny: a CPU smoke run)")
    import transformers

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}", flush=True)
    start = time.perf_counter()
    rows: list[dict] = []
    models = None
    with ResultFile(__name__, a.out) as out:

        def record(row: dict) -> None:
            rows.append(row)
            out.write(row)
            print(row, flush=True)

        for part in a.parts.split(","):
            if time.perf_counter() - start > a.budget_s:
                print(f"skipped {part}: past the {a.budget_s:.0f} s budget", flush=True)
                continue
            if part == "capture" and device == "cuda":  # in a subprocess: a failed capture breaks the process
                capture_in_subprocess(record)
            elif part in ("train", "generate"):
                if models is None:
                    models = build_models(TINY if a.tiny else QWEN3, a.layers, device)
                    models = {name: models[name] for name in a.models.split(",")}
                if part == "train":
                    train(models, a.reps, a.seq, device, record, tuple(a.modes.split(",")))
                else:
                    generate(models, a.new_tokens, device, record, tuple(int(b) for b in a.batches.split(",")))
            else:
                raise SystemExit(f"unknown part {part!r}; expected capture, train or generate")
            print(f"[{part} done at {time.perf_counter() - start:.0f} s]", flush=True)
    summary(rows)


if __name__ == "__main__":
    main()
