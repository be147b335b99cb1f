"""torch.compile against eager, hf-moe against transformers' own MoE model on the same weights (GPU, bf16).

`--shape qwen3`: Qwen3-30B-A3B-shaped layers (H 2048, I 768, E 128, k 8, 32 heads, 4 KV heads, head_dim 128, q/k
norm), 4 by default, in transformers' `Qwen3MoeForCausalLM` (grouped_mm experts) and `HfMoeForCausalLM`;
`--shape mixtral`: Mixtral-8x7B-shaped layers (H 4096, I 14336, E 8, k 2, 32 heads, 8 KV heads, head_dim 128, RoPE
theta 1e6), 2 by default, in `MixtralForCausalLM` and `HfMoeForCausalLM`. Vocabulary 32k. hf-moe's model is imported
from transformers' one (`benchmarks/compile_models.py`); the row `logits_rel_err` checks once, before anything is
timed, that the two compute the same function (bf16 on the GPU; float32 with `--tiny`).

- `train`: forward + backward of 4 × 2048 tokens, eager and `torch.compile(model)`, tokens/s, first-call seconds,
  peak memory; transformers' model also compiled with flex attention (`--peer-attention`), its fastest compiled
  configuration in the GPU image, which the training target compares with; then hf-moe and that fastest
  configuration compiled at once and timed against each other, steps alternating and back to back
  (`train-alternating_*`, `train-back-to-back_*` rows: the same drift on both);
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

`first_call_s`: compiled training, the compile and the step; static-cache generate, the whole generate whose decode
step transformers compiles; dynamic-cache generate, a warm-up that builds what a process makes once per shape (e.g.
cuDNN's SDPA plan per KV length, docs/decisions/decode-attention.md), paid by whichever model meets the shape first,
so no comparison of the models. Every model's generate is warmed up before any is timed.

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
import contextlib
import gc
import time
from collections.abc import Callable

import torch

from hf_moe import CUDAGraphConfig, HfMoeForCausalLM
from hf_moe.decode_graphs import decode_graphs

from .compile_capture import capture_in_subprocess
from .compile_models import (
    SHAPES,
    TINY,
    VARIANTS,
    build_models,
    case_name,
    logits_check,
    training_cases,
    training_step,
    with_llama_norms,
)
from .compile_report import check_failed, fastest, summary
from .kernel_profile import profile_train
from .record import ResultFile, error_row
from .timing import device_times, first_call_seconds, ms_per_call, seconds_per_call

# steps timed as one in the back-to-back rows: enough that one step's launch and sync are a small part
BACK_TO_BACK = 8


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
    cases = [(name, None, mode) for name in models for mode in modes]
    if "compiled" in modes:
        cases += [(name, attention, "compiled") for name, attention in training_cases(models, peer_attention)
                  if attention]
    for name, attention, mode in cases:
        what = f"train_{case_name(name, attention)}_{mode}"
        if past(deadline, what, record):
            continue
        with training_step(models, name, ids, attention, compiled=mode == "compiled") as step:
            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                first = first_call_seconds(step, device)
                step()
                seconds = seconds_per_call(step, reps, device)
                row = {"what": what, "tokens_per_s": ids.numel() / seconds, "ms": seconds * 1e3,
                       "first_call_s": first}
                if device == "cuda":
                    row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            except Exception as e:  # noqa: BLE001 - report and go on with the other cases
                row = error_row(what, e)
            record(row)
        release(device)


def fastest_peer(rows: list[dict]) -> str | None:
    """The attention kernel of transformers' fastest compiled training row (None: its default)."""
    best = fastest({r["what"]: r for r in rows}, "train_transformers*_compiled")
    return best and best["what"][len("train_transformers"):-len("_compiled")].removeprefix("-") or None


def head_to_head(models: dict, reps: int, seq: int, device: str, record: Callable[[dict], None],
                 peer_attention: str | None, deadline: float = float("inf")) -> None:
    """hf-moe and transformers' model (with `peer_attention`, its fastest compiled configuration), both compiled at
    once and timed against each other: in `reps` rounds that alternate them, each step from an idle device
    (`train-alternating_<case>_compiled`, with `host_ms`: the host's time to issue the step), then `BACK_TO_BACK`
    steps timed as one, their launches overlapping the device's work as in a training loop
    (`train-back-to-back_<case>_compiled`). Drift of clocks and temperature, which the one-case-after-another rows of
    `train` can put on one model only, falls on both alike here."""
    cases = {"hf-moe": ("hf-moe", None), case_name("transformers", peer_attention): ("transformers", peer_attention)}
    if past(deadline, "train-alternating", record):
        return
    vocab = models["hf-moe"].config.vocab_size
    ids = torch.randint(0, vocab, (4, seq), device=device, generator=torch.Generator(device).manual_seed(1))
    try:
        with contextlib.ExitStack() as stack:
            steps = {case: stack.enter_context(training_step(models, name, ids, attention))
                     for case, (name, attention) in cases.items()}
            seconds, host_seconds = device_times(steps, device, reps, warmup=2)
            back_ms = {case: ms_per_call(step, BACK_TO_BACK, device) for case, step in steps.items()}
    except Exception as e:  # noqa: BLE001 - report and go on with the other parts
        record(error_row("train-alternating", e))
        return
    finally:
        release(device)
    for case in cases:
        record({"what": f"train-alternating_{case}_compiled", "tokens_per_s": ids.numel() / seconds[case],
                "ms": seconds[case] * 1e3, "host_ms": host_seconds[case] * 1e3, "reps": reps})
    for case in cases:
        record({"what": f"train-back-to-back_{case}_compiled", "tokens_per_s": ids.numel() * 1e3 / back_ms[case],
                "ms": back_ms[case], "steps": BACK_TO_BACK})


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="capture,train,generate",
                    help="comma list of capture, train, generate, decode, profile (GPU kernel time by kind, idle gaps)")
    ap.add_argument("--shape", default="qwen3", choices=sorted(SHAPES), help="the layers' shape (default qwen3)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 qwen3, 2 mixtral)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seq", type=int, default=None, help="training sequence length, batch 4 (default 2048; 128 tiny)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no part or case after this many seconds")
    ap.add_argument("--models", default="hf-moe,transformers",
                    help="comma list of hf-moe, transformers, hf-moe-llama-norm (hf-moe with transformers' "
                         "eight-operator RMSNorm instead of torch's fused one), hf-moe-no-quack (training: the "
                         "weight gradients on torch's grouped GEMM where quack is installed), "
                         "hf-moe-unfused-loss (training: transformers' cross-entropy instead of the fused one), "
                         "hf-moe-llama-rope (RoPE's cosines from Llama's operators instead of one custom op), "
                         "hf-moe-unfused-norm-rope (q/k norm and RoPE from torch's operators instead of one kernel), "
                         "hf-moe-two-acc (the fused gate/up kernel with two accumulators at every width)")
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
    known = {"hf-moe", "transformers", "hf-moe-llama-norm", *VARIANTS}
    if not names or set(names) - known:
        raise SystemExit(f"--models {a.models!r}: expected a comma list of {', '.join(sorted(known))}")
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
                    models.update({name: models["hf-moe"] for name in VARIANTS if name in names})
                    models = {name: models[name] for name in names}
                batches = tuple(int(b) for b in a.batches.split(","))
                if part == "train":
                    modes = tuple(a.modes.split(","))
                    train(models, a.reps, seq, device, record, modes, deadline,
                          tuple(x for x in peer_attention.split(",") if x))
                    if "compiled" in modes and {"hf-moe", "transformers"} <= set(models):
                        head_to_head(models, a.reps, seq, device, record, fastest_peer(rows), deadline)
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
