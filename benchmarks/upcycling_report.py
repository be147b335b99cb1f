"""Merge the rows of `upcycling-quality` calls into a table, a loss-curve plot and docs/upcycling.md's results section.

    python -m benchmarks.upcycling_report RESULTS... [--plot docs/upcycling-quality.png] [--doc docs/upcycling.md]

RESULTS are the `.jsonl` files the suite writes, or saved console output (its `UPQ {...}` lines are read). Without
`--doc` the section is printed; with it, the text between the section's markers in that file is replaced.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

BEGIN, END = "<!-- upcycling-quality:begin -->", "<!-- upcycling-quality:end -->"
ORDER = "abcde"


def read_rows(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line.startswith("UPQ "):
                line = line[4:]
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def merge(rows: list[dict]) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """(setup rows, base rows, finished runs by variant letter); a run id seen twice keeps its last row."""
    setups = [r for r in rows if r.get("kind") == "setup"]
    bases = [r for r in rows if r.get("kind") == "base"]
    runs: dict[str, dict] = {}
    for r in rows:
        if r.get("kind") == "run" and not r.get("skipped"):
            runs[r["run"]] = r
    by_variant: dict[str, list[dict]] = {}
    for run_id in sorted(runs, key=lambda k: (ORDER.index(k[0]), int(k[1:]))):
        by_variant.setdefault(run_id[0], []).append(runs[run_id])
    return setups, bases, by_variant


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) if len(values) > 1 else 0.0


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def table(by_variant: dict[str, list[dict]]) -> list[str]:
    dense = [r["heldout"] for r in by_variant.get("a", [])]
    dense_mean = statistics.fmean(dense) if dense else None
    lines = ["| run | seeds | held-out loss (mean, range) | vs dense continued | tokens/s | active params | "
             "total params | peak memory |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, runs in by_variant.items():
        mean, spread = _mean_spread([r["heldout"] for r in runs])
        delta = "—" if key == "a" or dense_mean is None else f"{mean - dense_mean:+.4f}"
        rates = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
        rate = f"{statistics.fmean(rates):,.0f}" if rates else "—"
        memory = [r["peak_mem_gib"] for r in runs if r.get("peak_mem_gib") is not None]
        mem = f"{max(memory):.1f} GiB" if memory else "—"
        seeds = ",".join(str(r["seed"]) for r in runs) + (" (incomplete)" if any(r.get("incomplete") for r in runs)
                                                          else "")
        spread_text = f" ± {spread / 2:.4f}" if len(runs) > 1 else ""
        lines.append(f"| ({key}) {runs[0]['label']} | {seeds} | {mean:.4f}{spread_text} | {delta} | {rate} | "
                     f"{_millions(runs[0]['params_active'])} | {_millions(runs[0]['params_total'])} | {mem} |")
    return lines


def plot(bases: list[dict], by_variant: dict[str, list[dict]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    if bases:
        xs, ys = zip(*[(p[0] / 1e6, p[1]) for p in bases[0]["curve"]])
        full.plot(xs, ys, color="black", label="dense pre-training (base)")
    colors = dict(zip(ORDER, ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for key, runs in by_variant.items():
        for i, r in enumerate(runs):
            xs, ys = zip(*[(p[0] / 1e6, p[1]) for p in r["curve"]])
            label = f"({key}) {r['label']}" if i == 0 else None
            for ax in (full, zoom):
                ax.plot(xs, ys, color=colors[key], alpha=0.9 if i == 0 else 0.5, linestyle="-" if i == 0 else "--",
                        label=label)
    start = min((r["curve"][0][0] for runs in by_variant.values() for r in runs if r["variant"] != "e"),
                default=0) / 1e6
    zoom.set_xlim(left=start)
    tail = [p[1] for runs in by_variant.values() for r in runs for p in r["curve"] if p[0] / 1e6 >= start]
    if tail:
        zoom.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    full.set(xlabel="tokens seen (M)", ylabel="held-out loss (nats/token)", title="Held-out loss")
    zoom.set(xlabel="tokens seen (M)", title="After upcycling (same M tokens for every run)")
    full.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def section(rows: list[dict], plot_path: str | None, doc_dir: Path | None) -> str:
    setups, bases, by_variant = merge(rows)
    setup = setups[0] if setups else {}
    args, corpus = setup.get("args", {}), setup.get("corpus", {})
    tokens_per_step = setup.get("tokens_per_step", 0)
    n = args.get("pretrain_steps", 0) * tokens_per_step
    m = args.get("continue_steps", 0) * tokens_per_step
    listed = corpus.get("packages", [])
    packages = ", ".join(f"{p['package']} {p['version']}" for p in listed if p.get("files"))
    missing = ", ".join(p["package"] for p in listed if p.get("missing"))
    unread = ", ".join(p["package"] for p in listed if not p.get("missing") and not p.get("files"))
    out = [BEGIN, "", "### Does upcycling pay? (`python -m benchmarks upcycling-quality`)", ""]
    out += [f"Measured on {setup.get('device', '?')}, torch {setup.get('torch', '?')}, transformers "
            f"{setup.get('transformers', '?')}, {args.get('dtype', '?')} compute with float32 master weights. "
            f"Corpus: Python sources and docs (.py, .pyi, .md, .rst, .txt) of {packages}"
            + (f" (not installed: {missing})" if missing else "")
            + (f" (not reached: the corpus stops at {args.get('corpus_bytes', 0) / 1e6:.0f} MB: {unread})" if unread
               else "")
            + f", exact duplicates dropped; {corpus.get('train_files', '?')} train / {corpus.get('heldout_files', '?')} held-out files "
            f"(split by file), {corpus.get('train_tokens', 0):,} train tokens, byte-level BPE vocabulary "
            f"{corpus.get('vocab_size', '?')} trained on the train split; held-out loss on "
            f"{corpus.get('eval_tokens', 0):,} tokens of the held-out files.", ""]
    out += [f"Dense Llama: hidden {args.get('hidden_size')}, {args.get('layers')} layers, {args.get('heads')} heads, "
            f"MLP {args.get('intermediate_size')}, tied embeddings, sequence {args.get('seq_len')}, "
            f"{tokens_per_step:,} tokens per step, AdamW (β 0.9/0.95, weight decay {args.get('weight_decay')}, "
            f"clip 1.0), peak LR {args.get('lr')}. Pre-trained N = {n / 1e6:.1f}M tokens (warm-up "
            f"{args.get('warmup_steps')} steps, then constant); every run then trains the same M = {m / 1e6:.1f}M "
            f"tokens, with the LR decayed linearly to 0 over the last {args.get('cooldown_frac', 0):.0%} of M. The "
            f"upcycled runs (converted by `conversions.upcycle` from the base checkpoint) start a fresh AdamW and "
            f"re-warm the LR over the first {args.get('rewarm_frac', 0):.0%} of M to {args.get('upcycle_lr_scale')} × "
            f"the peak; the dense run keeps its optimizer state and LR. MoE runs: load-balancing loss coefficient "
            f"{args.get('aux_coef')}, dropless top-k routing.", ""]
    if bases:
        base_losses = ", ".join(f"{b['heldout']:.4f}" for b in bases)
        out += [f"Base (dense after N tokens): held-out loss {base_losses} (one value per GPU call: each call "
                f"rebuilds it from the same data and seed), {bases[0].get('tokens_per_s', 0):,} tokens/s.", ""]
    out += table(by_variant) + [""]
    out += ["Held-out loss ± half the range over seeds; \"vs dense continued\" is the difference of the means "
            "(negative: better than dense). Active parameters count k/E of the routed experts; all counts include "
            "the tied embedding. Tokens/s is the training step rate (forward, backward, optimizer), evaluations "
            "excluded; peak memory is what the run itself allocates (model, float32 masters, AdamW, activations).",
            ""]
    loads = [f"{r['run']} {max(r['max_expert_load']):.2f}" for runs in by_variant.values() for r in runs
             if r.get("max_expert_load")]
    if loads:
        out += ["Load balance at the end (busiest expert's share of routed tokens × number of experts, worst layer; "
                "1 = balanced): " + ", ".join(loads) + ".", ""]
    if plot_path:
        rel = Path(plot_path).name if doc_dir is None else Path(plot_path).resolve().relative_to(doc_dir.resolve())
        out += [f"![held-out loss curves]({rel})", ""]
    out += ["Reproduce (one GPU; the first command sizes N and M to the time budget on the GPU at hand, the second "
            "repeats these sizes exactly):", "", "```bash"]
    for s in setups:
        a = s.get("args", {})
        budget = f" --time-budget {a['time_budget']:g}" if a.get("time_budget") else ""
        out.append(f"python -m benchmarks upcycling-quality --runs {a.get('runs')}{budget}")
        out.append(f"python -m benchmarks upcycling-quality --runs {a.get('runs')} --pretrain-steps "
                   f"{a.get('pretrain_steps')} --continue-steps {a.get('continue_steps')}")
    out += ["python -m benchmarks.upcycling_report upcycling-quality-*.jsonl --plot docs/upcycling-quality.png "
            "--doc docs/upcycling.md", "```", "", END]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.upcycling_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+")
    p.add_argument("--plot", default=None, help="write the loss curves there (PNG; needs matplotlib)")
    p.add_argument("--doc", default=None, help="replace the section between the markers in this markdown file")
    args = p.parse_args()
    rows = read_rows(args.results)
    _, bases, by_variant = merge(rows)
    if args.plot and not plot(bases, by_variant, args.plot):
        print("matplotlib is not installed: no plot")
        args.plot = None
    text = section(rows, args.plot, Path(args.doc).parent if args.doc else None)
    if not args.doc:
        print(text)
        return
    doc = Path(args.doc).read_text()
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    Path(args.doc).write_text(doc)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
