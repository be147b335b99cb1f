"""The summary `python -m benchmarks compile` prints from its rows: the eager / compiled table, hf-moe against
transformers, issue 18's targets as met or not, the first-call (compile) seconds, the checks and the errors."""

from __future__ import annotations

import fnmatch
import operator

# (what, numerator row, denominator row, comparison, bound): issue 18's targets on tokens/s ratios. A row name with
# `*` stands for the fastest of the rows it matches (a peer's best configuration counts).
TARGETS = (
    ("compiled training hf-moe / transformers' fastest compiled", "train_hf-moe_compiled",
     "train_transformers*_compiled", ">=", 1.3),
    ("compiled training, steps alternating, hf-moe / transformers' fastest compiled",
     "train-alternating_hf-moe_compiled", "train-alternating_transformers*_compiled", ">=", 1.3),
    ("compiled training, steps back to back, hf-moe / transformers' fastest compiled",
     "train-back-to-back_hf-moe_compiled", "train-back-to-back_transformers*_compiled", ">=", 1.3),
    ("compiled generate bs16 hf-moe / transformers", "generate_bs16_hf-moe_static",
     "generate_bs16_transformers_static", ">=", 1.5),
    ("compiled generate bs1 hf-moe / transformers", "generate_bs1_hf-moe_static", "generate_bs1_transformers_static",
     ">=", 1.0),
    ("hf-moe generate bs1 compiled / plain generate (no compile)", "generate_bs1_hf-moe_static",
     "generate_bs1_hf-moe_default", "<=", 2.0),
)
_COMPARE = {">=": operator.ge, "<=": operator.le}


def fastest(by: dict[str, dict], what: str) -> dict | None:
    """The timed row named `what`; for a name with `*`, the one with the most tokens/s of those it matches."""
    rows = [r for w, r in by.items() if fnmatch.fnmatchcase(w, what)] if "*" in what else [by.get(what, {})]
    return max((r for r in rows if r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"], default=None)


def tokens_per_s(by: dict[str, dict], what: str) -> float | None:
    """The tokens/s of `fastest(by, what)`."""
    row = fastest(by, what)
    return row and row["tokens_per_s"]


def ratio(by: dict[str, dict], ours: str, theirs: str) -> float | None:
    a, b = tokens_per_s(by, ours), tokens_per_s(by, theirs)
    return a / b if a and b else None


def target_lines(by: dict[str, dict]) -> list[str]:
    """`target X: measured Y (met|not met)`, one line per target."""
    lines = []
    for label, ours, theirs, op, bound in TARGETS:
        r = ratio(by, ours, theirs)
        verdict = "not measured" if r is None else "met" if _COMPARE[op](r, bound) else "not met"
        lines.append(f"target {label} {op} {bound}: measured {'-' if r is None else round(r, 3)} ({verdict})")
    return lines


def check_failed(rows: list[dict]) -> bool:
    """Whether the logits check ran and failed (or raised): the measured models are then not the same function."""
    return any(r["what"] == "logits_rel_err" and not r.get("ok", False) for r in rows)


def summary(rows: list[dict]) -> None:
    by = {r["what"]: r for r in rows}

    def tps(key):
        return by.get(key, {}).get("tokens_per_s")

    print("\n| case | eager tok/s | compiled tok/s | compiled / eager |")
    print("| --- | --- | --- | --- |")
    trained = [r["what"][len("train_"):].rpartition("_")[0] for r in rows if r["what"].startswith("train_")]
    peers = sorted({name for name in trained if name.startswith("transformers-")})
    variants = sorted({name for name in trained if name.startswith("hf-moe-")})
    for name in ("transformers", *peers, "hf-moe", *variants):
        e, c = tps(f"train_{name}_eager"), tps(f"train_{name}_compiled")
        if name != "transformers" and name != "hf-moe" and not (e or c):
            continue
        print(f"| train {name} | {e and round(e)} | {c and round(c)} | {e and c and round(c / e, 3)} |")
    for batch in (16, 1):
        for name in ("transformers", "hf-moe"):
            e, c = tps(f"generate_bs{batch}_{name}_dynamic"), tps(f"generate_bs{batch}_{name}_static")
            print(f"| generate bs{batch} {name} (dynamic eager / static compiled) | {e and round(e, 1)} | "
                  f"{c and round(c, 1)} | {e and c and round(c / e, 3)} |")
    for batch in (16, 1):
        for case, label in (("default", "plain generate (CUDA-graph decode by default)"),
                            ("graphs", "static cache, CUDA-graph decode asked for")):
            g, c = tps(f"generate_bs{batch}_hf-moe_{case}"), tps(f"generate_bs{batch}_hf-moe_static")
            if g:
                print(f"| generate bs{batch} hf-moe, {label} (no compile) | - | {round(g, 1)} | "
                      f"compiled / this {c and round(c / g, 3)} |")
    pairs = [("train compiled", "train_hf-moe_compiled", "train_transformers_compiled"),
             ("train compiled, against transformers' fastest compiled", "train_hf-moe_compiled",
              "train_transformers*_compiled"),
             ("train compiled, steps alternating", "train-alternating_hf-moe_compiled",
              "train-alternating_transformers*_compiled"),
             ("train compiled, steps back to back", "train-back-to-back_hf-moe_compiled",
              "train-back-to-back_transformers*_compiled"),
             ("train eager", "train_hf-moe_eager", "train_transformers_eager"),
             ("generate bs16 static", "generate_bs16_hf-moe_static", "generate_bs16_transformers_static"),
             ("generate bs1 static", "generate_bs1_hf-moe_static", "generate_bs1_transformers_static"),
             ("generate bs1 eager", "generate_bs1_hf-moe_dynamic", "generate_bs1_transformers_dynamic")]
    for label, ours, theirs in pairs:
        r = ratio(by, ours, theirs)
        print(f"hf-moe / transformers, {label}: {r and round(r, 3)}")
    for batch in sorted({r["batch"] for r in rows if "ms_per_step" in r}):
        ours, theirs = (by.get(f"decode_bs{batch}_{name}", {}).get("ms_per_step") for name in ("hf-moe", "transformers"))
        print(f"eager decode bs{batch} ms/step: hf-moe {ours and round(ours, 3)}, transformers "
              f"{theirs and round(theirs, 3)}, hf-moe / transformers {ours and theirs and round(ours / theirs, 3)}")
        llama = by.get(f"decode_bs{batch}_hf-moe-llama-norm", {}).get("ms_per_step")
        if llama:
            print(f"eager decode bs{batch} ms/step: hf-moe with Llama's RMSNorm {round(llama, 3)}, fused / Llama's "
                  f"{ours and round(ours / llama, 3)}")
    print()
    for line in target_lines(by):
        print(line)
    firsts = [f"{r['what']} {r['first_call_s']:.1f}" for r in rows if "first_call_s" in r]
    print("\nfirst call s (compiled: the compile; dynamic generate: the warm-up):", "; ".join(firsts) or "-")
    for r in rows:
        if r["what"] == "logits_rel_err" and "ok" in r:
            print(f"check logits_rel_err ({r['dtype']}): {r['value']:.2e} <= {r['tolerance']:g} "
                  f"({'ok' if r['ok'] else 'FAILED: the two models are not the same function'})")
        if "skipped" in r:
            print(f"SKIPPED {r['what']}: {r['skipped']}")
        if "error" in r:
            print(f"ERROR {r['what']}: {r['error']}\n{r.get('where', '')}")
            if "cause" in r:
                print(f"  CAUSED BY {r['cause']}\n{r['cause_where']}")
