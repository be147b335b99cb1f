"""torch.compile against eager, hf-moe against transformers' own MoE model on the same weights (GPU, bf16).

`--shape qwen3`: Qwen3-30B-A3B-shaped layers (H 2048, I 768, E 128, k 8, 32 heads, 4 KV heads, head_dim 128, q/k
norm), 4 by default, in transformers' `Qwen3MoeForCausalLM` (grouped_mm experts) and `HfMoeForCausalLM`;
`--shape mixtral`: Mixtral-8x7B-shaped layers (H 4096, I 14336, E 8, k 2, 32 heads, 8 KV heads, head_dim 128, RoPE
theta 1e6), 2 by default, in `MixtralForCausalLM` and `HfMoeForCausalLM`. Vocabulary 32k. hf-moe's model is imported
from transformers' one (`benchmarks/compile_models.py`); the row `logits_rel_err` checks once, before anything is
timed, that the two compute the same function (bf16 on the GPU; float32 with `--tiny`).

- `train`: forward + backward of 4 × 2048 tokens, eager and `torch.compile(model)`, tokens/s, first-call seconds,
  peak memory; transformers' model also compiled with flex attention (`--peer-attention`), its fastest compiled
  configuration in the GPU image, which the training target compares with;
- `generate`: 128 new tokens (greedy), dynamic cache eager (`cache_implementation="dynamic"`) and static cache
  compiled, at batch 16 and 1; for hf-moe also static cache with `compile_config=hf_moe.CUDAGraphConfig()` (the eager
  step replayed from CUDA graphs, no compile: `_graphs` rows) and a plain `generate` (`_default` rows: hf-moe's
  default, CUDA-graph decoding where `hf_moe.decode_graphs.default_graph_decoding` allows);
- `decode`: eager dynamic-cache greedy decoding, ms per step at each `--batches` size (`--new-tokens` per call,
  `--reps` rounds alternating the models; with `--tiny` the CPU's host time per step, which eager decoding at
  batch 1 is bound by on a GPU too);
- `capture`: a DeepSeek-V3-shaped block (H 7168, I 2048, E 256, k 8) at 64 decode tokens captured in a CUDA graph
  piece by piece (router, sort, experts, whole block, in global and thread-local capture mode), with the full error
  of each capture that fails.

`first_call_s` is the first call's seconds. Compiled training: the dynamo + inductor compile of forward and backward and
the step itself. Static-cache generate: the whole generate whose decode step transformers compiles (and captures in CUDA
graphs), once per batch size. Dynamic-cache generate: the same full generate as the timed one, run to reach steady
state: it builds what a process makes once per shape, e.g. cuDNN's SDPA execution plan for every new KV length where
SDPA picks cuDNN (~63 ms each on an H200 with torch 2.11; hf-moe's eager inference leaves cuDNN out, see
docs/decisions/decode-attention.md). Such a process-wide cost is paid by whichever model first meets the shape, so
this first_call_s is no comparison of the models. Every model's generate is warmed up before any is timed, so each
timed call is steady state and none finds caches filled for it by the other model's timed call.

    python -m benchmarks compile                          # every part, qwen3 shape (nothing starts after --budget-s)
    python -m benchmarks compile --shape mixtral --parts train,generate
    python -m benchmarks compile --tiny --shape mixtral   # CPU smoke run, float32
    python -m benchmarks compile --parts decode --batches 1,16 --new-tokens 64   # eager decode ms/step

Prints one line per measurement, then a summary: the table, hf-moe / transformers ratios, issue 18's targets as
`target X: measured Y (met|not met)`, the first-call seconds and the check. Rows go to
benchmarks/results/compile-<time>.jsonl, or to `--out` (a .jsonl path). Exits 1 when the logits check fails.
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

from hf_moe import CUDAGraphConfig, HfMoeForCausalLM
from hf_moe.decode_graphs import decode_graphs

from .compile_models import SHAPES, TINY, build_models, logits_check, with_llama_norms
from .compile_report import check_failed, summary
from .kernel_profile import profile_train
from .record import ResultFile
from .timing import median_and_min, synchronize

DSV3 = (7168, 2048, 256, 8)  # hidden, moe intermediate, experts, top-k


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


def past(deadline: float, what: str, record: Callable[[dict], None]) -> bool:
    """Whether the run's budget is spent; if so `what` is recorded as skipped (the run ends with its summary)."""
    if time.perf_counter() < deadline:
        return False
    record({"what": what, "skipped": "past the --budget-s budget"})
    return True


def release(device: str) -> None:
    """Drop compiled code and free its memory before the next case."""
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def train(models: dict, reps: int, seq: int, device: str, record: Callable[[dict], None],
          modes: tuple[str, ...] = ("eager", "compiled"), deadline: float = float("inf"),
          peer_attention: tuple[str, ...] = ()) -> None:
    """Training steps of every model in every mode; transformers' model also compiled with each attention kernel of
    `peer_attention` (rows `train_transformers-<kernel>_compiled`): its fastest compiled configuration counts."""
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (4, seq), device=device, generator=torch.Generator(device).manual_seed(1))
    cases = [(name, model, mode, None) for name, model in models.items() for mode in modes]
    if "transformers" in models and "compiled" in modes:
        cases += [("transformers", models["transformers"], "compiled", attention) for attention in peer_attention]
    for name, model, mode, attention in cases:
        what = f"train_{name}{f'-{attention}' if attention else ''}_{mode}"
        if past(deadline, what, record):
            continue
        model.train()
        default_attention = model.config._attn_implementation
        model.set_attn_implementation(attention or default_attention)
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
        model.set_attn_implementation(default_attention)
        model.eval()
        release(device)


def generate(models: dict, new_tokens: int, device: str, record: Callable[[dict], None],
             batches: tuple[int, ...] = (16, 1), deadline: float = float("inf")) -> None:
    """Per batch size and cache: every model's first call (the same full generate: compile or warm-up), then every
    model's timed call (see the module docstring for why in this order)."""
    vocab = next(iter(models.values())).config.vocab_size
    for model in models.values():
        model.eval()
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, 64), device=device, generator=torch.Generator(device).manual_seed(2))
        for cache in ("dynamic", "default", "static", "graphs"):
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            if cache == "dynamic":  # eager steps (hf-moe's default decodes from CUDA graphs: the "default" rows)
                kwargs["cache_implementation"] = "dynamic"
            if cache in ("static", "graphs"):
                kwargs["cache_implementation"] = "static"  # transformers compiles the decode step on CUDA
            if cache == "graphs":  # hf-moe's eager decode step replayed from CUDA graphs instead
                kwargs["compile_config"] = CUDAGraphConfig()
            first = {}
            for name, model in models.items():
                what = f"generate_bs{batch}_{name}_{cache}"
                if cache in ("default", "graphs") and not isinstance(model, HfMoeForCausalLM):
                    continue
                if past(deadline, what, record):
                    continue
                try:
                    first[name] = first_call_seconds(lambda: model.generate(ids, **kwargs), device)
                except Exception as e:  # noqa: BLE001 - report and go on with the other cases
                    record(error_row(what, e))
            for name, first_s in first.items():
                what, model = f"generate_bs{batch}_{name}_{cache}", models[name]
                try:
                    seconds = seconds_per_call(lambda: model.generate(ids, **kwargs), 1, device)
                    row = {"what": what, "tokens_per_s": batch * new_tokens / seconds, "s": seconds,
                           "first_call_s": first_s, "compiled": "_compiled_call" in model.__dict__}
                    if cache in ("default", "graphs"):  # 1: every call replayed the first call's graph
                        row["graphs_captured"] = len(decode_graphs(model).graphs)
                except Exception as e:  # noqa: BLE001
                    row = error_row(what, e)
                record(row)
        for model in models.values():
            model.__dict__.pop("_compiled_call", None)
        release(device)


def decode(models: dict, new_tokens: int, device: str, record: Callable[[dict], None], batches: tuple[int, ...],
           reps: int, deadline: float = float("inf")) -> None:
    """Eager dynamic-cache greedy decoding, ms per step: (a generate of `new_tokens` − one of 1 new token) /
    (`new_tokens` − 1), so the prompt's prefill cancels; the median over `reps` rounds that alternate the models,
    after a warm-up of both calls (at bs1 this is host time: the GPU work of a step is far shorter)."""
    vocab = next(iter(models.values())).config.vocab_size
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="dynamic")
    for batch in batches:
        if past(deadline, f"decode_bs{batch}", record):
            continue
        ids = torch.randint(0, vocab, (batch, 32), device=device, generator=torch.Generator(device).manual_seed(4))
        calls = {(name, n): lambda m=model, n=n: m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
                 for name, model in models.items() for n in (new_tokens, 1)}
        for call in calls.values():
            call()
        steps: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(reps):
            for name in models:
                full, one = (first_call_seconds(calls[name, n], device) for n in (new_tokens, 1))
                steps[name].append((full - one) / (new_tokens - 1))
        for name, values in steps.items():
            record({"what": f"decode_bs{batch}_{name}", "ms_per_step": 1e3 * sorted(values)[len(values) // 2],
                    "batch": batch, "new_tokens": new_tokens, "reps": reps})


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="capture,train,generate",
                    help="comma list of capture, train, generate, decode, profile (GPU kernel time by kind)")
    ap.add_argument("--shape", default="qwen3", choices=sorted(SHAPES), help="the layers' shape (default qwen3)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 qwen3, 2 mixtral)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=None, help="training sequence length, batch 4 (default 2048; 128 tiny)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no part or case after this many seconds")
    ap.add_argument("--models", default="hf-moe,transformers",
                    help="comma list of hf-moe, transformers, hf-moe-llama-norm (hf-moe with transformers' "
                         "eight-operator RMSNorm instead of torch's fused one)")
    ap.add_argument("--modes", default="eager,compiled", help="training modes: comma list of eager, compiled")
    ap.add_argument("--batches", default="16,1", help="generate batch sizes")
    ap.add_argument("--peer-attention", default=None,
                    help="comma list of attention kernels transformers' model is also trained compiled with (its "
                         "fastest compiled row is the one hf-moe is compared with); default flex_attention on the GPU "
                         "(no flex backward on the CPU), '' for none")
    ap.add_argument("--tiny", action="store_true", help="a tiny model on the CPU in float32 (a smoke run)")
    ap.add_argument("--out", default=None, help="results .jsonl (default: benchmarks/results/compile-<time>.jsonl)")
    a = ap.parse_args()
    names = a.models.split(",")
    if not names or set(names) - {"hf-moe", "transformers", "hf-moe-llama-norm"}:
        raise SystemExit(f"--models {a.models!r}: expected a comma list of hf-moe, transformers, hf-moe-llama-norm")
    device, dtype = ("cpu", torch.float32) if a.tiny else ("cuda", torch.bfloat16)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m benchmarks compile needs a CUDA device (or --tiny: a CPU smoke run)")
    shape = (TINY if a.tiny else SHAPES)[a.shape]
    layers = a.layers or shape["layers"]
    seq = a.seq or (128 if a.tiny else 2048)
    peer_attention = a.peer_attention if a.peer_attention is not None else "" if a.tiny else "flex_attention"
    import transformers

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}, shape {a.shape}"
          f"{' (tiny)' if a.tiny else ''}, {layers} layers", flush=True)
    start = time.perf_counter()
    deadline = start + a.budget_s
    rows: list[dict] = []
    models = None
    with ResultFile(__name__, a.out) as out:

        def record(row: dict) -> None:
            rows.append(row)
            out.write(row)
            print(row, flush=True)

        for part in a.parts.split(","):
            if time.perf_counter() > deadline:
                print(f"skipped {part}: past the {a.budget_s:.0f} s budget", flush=True)
                continue
            if part == "capture" and device == "cuda":  # in a subprocess: a failed capture breaks the process
                capture_in_subprocess(record)
            elif part in ("train", "generate", "decode", "profile"):
                if models is None:
                    built = time.perf_counter()
                    models = build_models(shape, layers, device, dtype)
                    print(f"[models built in {time.perf_counter() - built:.0f} s]", flush=True)
                    try:
                        record(logits_check(models, device))
                    except Exception as e:  # noqa: BLE001 - a failed check is reported, and fails the run
                        record(error_row("logits_rel_err", e))
                    if "hf-moe-llama-norm" in names:
                        models["hf-moe-llama-norm"] = with_llama_norms(models["hf-moe"])
                    models = {name: models[name] for name in names}
                batches = tuple(int(b) for b in a.batches.split(","))
                if part == "train":
                    train(models, a.reps, seq, device, record, tuple(a.modes.split(",")), deadline,
                          tuple(x for x in peer_attention.split(",") if x))
                elif part == "profile" and device == "cuda":
                    profile_train(models, seq, record, tuple(x for x in peer_attention.split(",") if x))
                elif part == "decode":
                    decode(models, a.new_tokens, device, record, batches, a.reps, deadline)
                elif part == "generate":
                    generate(models, a.new_tokens, device, record, batches, deadline)
            else:
                raise SystemExit(f"unknown part {part!r}; expected capture, train, generate, decode or profile")
            print(f"[{part} done at {time.perf_counter() - start:.0f} s]", flush=True)
    summary(rows)
    if check_failed(rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
