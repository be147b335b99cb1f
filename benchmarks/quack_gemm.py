"""quack-kernels' grouped GEMMs (CuTe-DSL, JIT-compiled) against hf-moe's own two, every GEMM of the experts' step.

For each shape it routes T tokens near-uniformly (seeded), sorts the (token, slot) rows by expert with the offsets on
the device, and times side by side, alternated round by round: (a) quack's `gemm` (varlen in M for the forward and
input-gradient GEMMs, varlen in K for the weight gradients; `cu_seqlens` = the offsets with a leading zero, int32 on
the device, no host sync), (b) hf-moe's Triton grouped GEMMs (`hf_moe.moe.kernels.grouped_gemm`; none for the weight
gradients) and (c) torch's grouped GEMM. The gate/up + SwiGLU row also times quack's gated epilogue (`gemm_gated`,
activation `swiglu`), which writes the projection with gate and up columns interleaved and leaves the routing weight
out: it is checked against its own reference. Each output is compared with a float32 per-expert reference (rel err).
The first call of each variant is timed apart: for quack it includes the JIT compile (cold unless `QUACK_CACHE_DIR`
already holds the kernels), for Triton its compile. Ratios are the best of hf-moe's two (Triton, torch) over quack
(> 1: quack faster). Shapes and layouts: the expert weights as stored, `gate_up_proj [E, 2I, H]`, `down_proj
[E, H, I]`. GPU with TMA (Hopper) and quack-kernels installed; `--budget-s` skips what would start after the budget.

    python -m benchmarks quack-gemm                    # Qwen3-30B-A3B at T = 8192 and 2048, Mixtral at T = 8192
    python -m benchmarks quack-gemm --cases qwen3:8192 --reps 50
"""

from __future__ import annotations

import argparse
import json
import os
import site
import sys
import time
from collections.abc import Callable

import torch

from .record import ResultFile
from .timing import device_times, ratio

SHAPES = {  # name: (hidden, moe_intermediate, experts, top_k)
    "qwen3": (2048, 768, 128, 8),
    "mixtral": (4096, 14336, 8, 2),
}
DEFAULT_CASES = "qwen3:8192,qwen3:2048,mixtral:8192"
OWN = ("triton", "torch")  # hf-moe's own two: the ratio's denominator is the faster of these
NO_QUACK = ("quack-kernels is not importable here ({error}); this suite needs it: pip install quack-kernels "
            "(with nvidia-cutlass-dsl and apache-tvm-ffi), or put an installed copy on PYTHONPATH")

Variant = tuple[Callable[[], torch.Tensor], torch.Tensor]  # (call, its float32 reference)


def import_quack() -> tuple[object | None, str]:
    """quack's GEMM interface module, imported only here (never at this module's import), or None and why not."""
    # nvidia-cutlass-dsl puts its `cutlass` package on sys.path through a .pth file, which Python reads only in site
    # folders: an install with `pip install --target DIR` on PYTHONPATH needs DIR read as one.
    for entry in list(sys.path):
        if os.path.isfile(os.path.join(entry, "nvidia_cutlass_dsl_packages.pth")):
            site.addsitedir(entry)
    try:
        from quack import gemm_interface
    except Exception as error:  # noqa: BLE001 - a broken install (missing CUDA libs) fails in many ways
        return None, f"{type(error).__name__}: {error}"
    return gemm_interface, ""


def routed_offsets(tokens: int, num_experts: int, top_k: int, seed: int, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """Expert end offsets `[E]` (int32, on the GPU) of `tokens × top_k` rows routed near-uniformly: each token's top-k
    of seeded uniform scores. Experts in `empty` get no rows."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(tokens, num_experts, device="cuda", generator=generator)
    scores[:, list(empty)] = -1.0
    expert = scores.topk(top_k, dim=-1).indices.reshape(-1)
    return torch.bincount(expert, minlength=num_experts).cumsum(0).to(torch.int32)


def reference_rows(a: torch.Tensor, weight_of: Callable[[int], torch.Tensor], bounds: list[int]) -> torch.Tensor:
    """float32 `[S, N]`: rows of expert e = `a_e @ weight_of(e)`."""
    out = a.new_zeros(a.shape[0], weight_of(0).shape[1], dtype=torch.float32)
    for e in range(len(bounds) - 1):
        start, end = bounds[e], bounds[e + 1]
        out[start:end] = a[start:end].float() @ weight_of(e).float()
    return out


def reference_weight_grad(a: torch.Tensor, b: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """float32 `[E, M, N]`: expert e = `a_eᵀ @ b_e` over its rows (zeros for an expert with none)."""
    out = a.new_zeros(len(bounds) - 1, a.shape[1], b.shape[1], dtype=torch.float32)
    for e in range(len(bounds) - 1):
        start, end = bounds[e], bounds[e + 1]
        out[e] = a[start:end].float().T @ b[start:end].float()
    return out


def swiglu_reference(gate_up: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """float32 `silu(gate) ⊙ up` (times the routing weight when given) of a `[S, 2I]` `[gate | up]` projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    return act if weight is None else act * weight[:, None]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def step_cases(qg, hidden: int, inter: int, num_experts: int, tokens: int, top_k: int, seed: int, tuned: bool):
    """Yield (GEMM name, multiply-adds, {variant: (call, float32 reference)}) for each GEMM of the experts' step;
    references are computed per case, so one case's float32 tensors are freed before the next."""
    from hf_moe.moe.kernels import grouped_gemm, swiglu  # Triton: imported once the options are read

    torch_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    rows = tokens * top_k
    offsets = routed_offsets(tokens, num_experts, top_k, seed)
    cu_seqlens = torch.nn.functional.pad(offsets, (1, 0))  # quack's form: [E + 1], leading zero, int32
    bounds = cu_seqlens.tolist()  # host copy for the references only
    generator = torch.Generator(device="cuda").manual_seed(seed + 1)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=generator) * scale).to(torch.bfloat16)

    x = randn(rows, hidden)
    weight = torch.rand(rows, device="cuda", generator=generator)
    gate_up_proj = randn(num_experts, 2 * inter, hidden, scale=hidden**-0.5)
    down_proj = randn(num_experts, hidden, inter, scale=inter**-0.5)
    act = randn(rows, inter)
    grad_y = randn(rows, hidden)
    grad_gate_up = randn(rows, 2 * inter)

    def quack(a: torch.Tensor, b: torch.Tensor, varlen: str) -> Callable[[], torch.Tensor]:
        key = "cu_seqlens_m" if varlen == "m" else "cu_seqlens_k"
        return lambda: qg.gemm(a, b, **{key: cu_seqlens}, tuned=tuned)

    gate_up_ref = reference_rows(x, lambda e: gate_up_proj[e].T, bounds)
    yield "gate/up", rows * hidden * 2 * inter, {
        "quack": (quack(x, gate_up_proj.transpose(1, 2), "m"), gate_up_ref),
        "triton": (lambda: grouped_gemm.grouped_mm(x, gate_up_proj.transpose(1, 2), offsets), gate_up_ref),
        "torch": (lambda: torch_grouped_mm(x, gate_up_proj.transpose(1, 2), offs=offsets), gate_up_ref),
    }
    act_ref = swiglu_reference(gate_up_ref, weight)
    unweighted_ref = swiglu_reference(gate_up_ref, None)
    del gate_up_ref

    def quack_then_swiglu() -> torch.Tensor:
        return swiglu.swiglu_forward(qg.gemm(x, gate_up_proj.transpose(1, 2), cu_seqlens_m=cu_seqlens, tuned=tuned),
                                     weight, offsets)

    def quack_gated() -> torch.Tensor:  # [gate; up] weight halves read as interleaved columns ("B" concat layout)
        return qg.gemm_gated(x, gate_up_proj.transpose(1, 2), activation="swiglu", cu_seqlens_m=cu_seqlens,
                             concat_layout=("B",), tuned=tuned)[1]

    yield "gate/up + SwiGLU", rows * hidden * 2 * inter, {
        "quack": (quack_then_swiglu, act_ref),
        "quack-gated": (quack_gated, unweighted_ref),
        "triton": (lambda: grouped_gemm.gate_up_swiglu(x, gate_up_proj, weight, offsets)[1], act_ref),
        "torch": (lambda: swiglu.swiglu_forward(torch_grouped_mm(x, gate_up_proj.transpose(1, 2), offs=offsets),
                                                weight, offsets), act_ref),
    }
    del act_ref, unweighted_ref
    ref = reference_rows(act, lambda e: down_proj[e].T, bounds)
    yield "down", rows * inter * hidden, {
        "quack": (quack(act, down_proj.transpose(1, 2), "m"), ref),
        "triton": (lambda: grouped_gemm.grouped_mm(act, down_proj.transpose(1, 2), offsets), ref),
        "torch": (lambda: torch_grouped_mm(act, down_proj.transpose(1, 2), offs=offsets), ref),
    }
    ref = reference_rows(grad_y, lambda e: down_proj[e], bounds)
    yield "input grad, down", rows * hidden * inter, {
        "quack": (quack(grad_y, down_proj, "m"), ref),
        "triton": (lambda: grouped_gemm.grouped_mm(grad_y, down_proj, offsets), ref),
        "torch": (lambda: torch_grouped_mm(grad_y, down_proj, offs=offsets), ref),
    }
    ref = reference_rows(grad_gate_up, lambda e: gate_up_proj[e], bounds)
    yield "input grad, gate/up", rows * 2 * inter * hidden, {
        "quack": (quack(grad_gate_up, gate_up_proj, "m"), ref),
        "triton": (lambda: grouped_gemm.grouped_mm(grad_gate_up, gate_up_proj, offsets), ref),
        "torch": (lambda: torch_grouped_mm(grad_gate_up, gate_up_proj, offs=offsets), ref),
    }
    del ref
    ref = reference_weight_grad(grad_y, act, bounds)  # [E, H, I], down_proj's layout
    yield "weight grad, down", rows * hidden * inter, {
        "quack": (quack(grad_y.t(), act, "k"), ref),
        "torch": (lambda: torch_grouped_mm(grad_y.t(), act, offs=offsets), ref),
    }
    del ref
    ref = reference_weight_grad(grad_gate_up, x, bounds)  # [E, 2I, H], gate_up_proj's layout
    yield "weight grad, gate/up", rows * 2 * inter * hidden, {
        "quack": (quack(grad_gate_up.t(), x, "k"), ref),
        "torch": (lambda: torch_grouped_mm(grad_gate_up.t(), x, offs=offsets), ref),
    }


def first_call(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """The output of `fn`'s first call and its wall seconds (compiles included), on an idle GPU."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_case(gemm: str, macs: int, variants: dict[str, Variant], reps: int, base: dict) -> dict:
    """One GEMM's row: first-call seconds and rel err of every variant, then the working ones timed alternated
    (median device ms, and the median host ms to issue the call)."""
    row = {**base, "gemm": gemm}
    working = {}
    for name, (fn, ref) in variants.items():
        try:
            out, seconds = first_call(fn)
        except Exception as error:  # noqa: BLE001 - report a failing variant and time the others
            row[f"{name}_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            continue
        row[f"{name}_first_call_s"] = seconds
        row[f"{name}_rel_err"] = rel_err(out, ref)
        working[name] = fn
        del out
    if working:
        device_s, host_s = device_times(working, "cuda", reps)
        ms = {name: seconds * 1e3 for name, seconds in device_s.items()}
        for name, value in ms.items():
            row[f"{name}_ms"] = value
            row[f"{name}_host_ms"] = host_s[name] * 1e3  # host time to issue the call (quack's eager varlen path)
            row[f"{name}_tflops"] = 2 * macs / value / 1e9
        own = [ms[name] for name in OWN if name in ms]
        for name in ("quack", "quack-gated"):
            if own and name in ms:
                row[f"best_own_over_{name}"] = min(own) / ms[name]
    return row


def empty_expert_check(qg, tuned: bool, seed: int) -> dict:
    """quack's varlen GEMMs where hf-moe's plans differ from the timed runs (Qwen3 widths, 256 tokens): two experts
    with no rows and 7 rows past `offsets[-1]` (dropped slots). The forward's rows must match, and the weight
    gradient's empty experts must come back zeros over a NaN-filled output (torch's do)."""
    hidden, inter, num_experts, top_k = SHAPES["qwen3"]
    empty = [0, num_experts // 2]
    offsets = routed_offsets(256, num_experts, top_k, seed, empty=tuple(empty))
    cu_seqlens = torch.nn.functional.pad(offsets, (1, 0))
    bounds = cu_seqlens.tolist()
    rows = bounds[-1] + 7  # the tail: rows no expert owns
    x = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
    grad = torch.randn(rows, 2 * inter, device="cuda").to(torch.bfloat16)
    w = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") * hidden**-0.5).to(torch.bfloat16)
    forward = qg.gemm(x, w.transpose(1, 2), cu_seqlens_m=cu_seqlens, tuned=tuned)
    grad_w = torch.full((num_experts, 2 * inter, hidden), float("nan"), device="cuda", dtype=torch.bfloat16)
    qg.gemm(grad.t(), x, out=grad_w, cu_seqlens_k=cu_seqlens, tuned=tuned)
    torch.cuda.synchronize()
    valid = bounds[-1]
    return {"what": "2 empty experts and a 7-row tail, qwen3 widths, T = 256",
            "forward_rel_err": rel_err(forward[:valid], reference_rows(x[:valid], lambda e: w[e].T, bounds)),
            "weight_grad_rel_err": rel_err(grad_w.nan_to_num(0.0), reference_weight_grad(grad[:valid], x[:valid],
                                                                                           bounds)),
            "weight_grad_empty_experts_all_zero": bool((grad_w[empty] == 0).all())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma list of shape:tokens, shapes " + ", ".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20, help="timed rounds per GEMM (each runs every variant once)")
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="wall seconds: no GEMM starts after this much (a compile under way finishes)")
    ap.add_argument("--tuned", action="store_true",
                    help="let quack autotune (compiles and times every Hopper config: minutes per GEMM; off: its "
                         "default config)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="append the rows to this JSONL file (default: benchmarks/results/)")
    a = ap.parse_args()
    cases = []
    for item in a.cases.split(","):
        name, _, tokens = item.partition(":")
        if name not in SHAPES or not tokens.isdigit() or int(tokens) < 1:
            ap.error(f"bad --cases entry {item!r}; expected shape:tokens, shape one of {', '.join(SHAPES)}, "
                     "tokens a positive integer")
        cases.append((name, int(tokens)))
    qg, why = import_quack()
    if qg is None:
        print(NO_QUACK.format(error=why), flush=True)
        return 2
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        print("quack-gemm needs a CUDA GPU with TMA (compute capability 9+)", flush=True)
        return 2
    import cutlass
    import quack
    import triton

    started = time.perf_counter()
    env = {"what": "env", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "quack": quack.__version__, "cutlass_dsl": cutlass.__version__,
           "quack_tuned": a.tuned}
    print(json.dumps(env), flush=True)
    results, skipped = [], []
    with ResultFile(__name__, a.out) as out:
        out.write(env)
        for name, tokens in cases:
            hidden, inter, num_experts, top_k = SHAPES[name]
            base = {"shape": name, "tokens": tokens, "rows_per_expert": tokens * top_k / num_experts}
            for gemm, macs, variants in step_cases(qg, hidden, inter, num_experts, tokens, top_k, a.seed, a.tuned):
                if time.perf_counter() - started > a.budget_s:
                    skipped.append(f"{name}:{tokens} {gemm}")
                    continue
                row = run_case(gemm, macs, variants, a.reps, base)
                row["elapsed_s"] = time.perf_counter() - started
                print(json.dumps(row), flush=True)
                out.write(row)
                results.append(row)
            torch.cuda.empty_cache()
        if time.perf_counter() - started <= a.budget_s:
            try:
                check = empty_expert_check(qg, a.tuned, a.seed)
            except Exception as error:  # noqa: BLE001
                check = {"what": "empty experts and tail", "error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(json.dumps(check), flush=True)
            out.write(check)
        else:
            skipped.append("empty-expert and tail check")
        print_table(results)
        if skipped:
            print(f"skipped past --budget-s {a.budget_s:.0f}: " + "; ".join(skipped))
        print(f"wall: {time.perf_counter() - started:.0f} s")
    return 0


def print_table(results: list[dict]) -> None:
    def cell(r: dict, name: str) -> str:
        if f"{name}_error" in r:
            return "error"
        if f"{name}_ms" not in r:
            return "-"
        return f"{r[f'{name}_ms']:.3f} ({r[f'{name}_tflops']:.0f}), {r[f'{name}_rel_err']:.1e}"

    names = ("quack", "quack-gated", "triton", "torch")
    print("\nms (TFLOP/s), rel err vs float32; best own / quack > 1: quack faster; first call s: quack's JIT compile")
    print("| shape | T | GEMM | " + " | ".join(names) + " | best own / quack | quack first call s |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- |")
    for r in results:
        own = [r[f"{n}_ms"] for n in OWN if f"{n}_ms" in r]
        factor = ratio(min(own), r["quack_ms"]) if own and "quack_ms" in r else "-"
        if own and "quack-gated_ms" in r:
            factor += f" (gated {ratio(min(own), r['quack-gated_ms'])})"
        first = f"{r['quack_first_call_s']:.1f}" if "quack_first_call_s" in r else "-"
        print(f"| {r['shape']} | {r['tokens']} | {r['gemm']} | " + " | ".join(cell(r, n) for n in names) +
              f" | {factor} | {first} |")
    for r in results:
        for key, value in r.items():
            if key.endswith("_error"):
                print(f"{r['shape']}:{r['tokens']} {r['gemm']} {key}: {value}")


if __name__ == "__main__":
    raise SystemExit(main())
