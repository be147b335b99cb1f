"""`python -m benchmarks upcycling-quality`: does upcycling a dense model pay, at equal tokens? (one GPU, issue 23)

A dense Llama is pre-trained for N tokens (the base); then each run trains M more tokens from it:

  a  dense, continued: the base model with its optimizer state, the schedule going on without a break
  b  upcycled: 8 experts top-2, each a copy of the dense MLP (Sparse Upcycling)
  c  drop-upcycled: as b, half of each expert's intermediate neurons re-initialised (Drop-Upcycling, r = 0.5)
  d  virtual groups: 32 experts of width I/4, top-4, plus a shared expert of width I (He et al. 2024)
  e  the MoE of b trained from scratch for N + M tokens (same data and schedule as the base, then as a)

b-d are converted by hf-moe's own `conversions.upcycle` from the base checkpoint on disk. Schedule: warm-up then a
constant peak LR for pre-training (the base is a checkpoint of the stable phase, as in a warmup-stable-decay run);
every run then trains at the peak and decays it linearly to zero over the last `--cooldown-frac` of M. The upcycled
runs start a fresh AdamW (the converter writes weights, not optimizer state) and re-warm the LR over the first
`--rewarm-frac` of M to `--upcycle-lr-scale` × the peak. Same batch, AdamW, weight decay, clipping for every run;
bf16 compute with float32 master weights. Run ids are a variant letter and a seed (`--runs`).

Sizing: with `--time-budget` and no `--pretrain-steps`, the call times a few training steps of each model kind
(dense, upcycled 8x top-2, virtual groups) and picks the largest N, with M = `--continue-ratio` × N, at which every
requested run fits the budget; the chosen steps are printed and recorded, so `--pretrain-steps P
--continue-steps C` repeats the same experiment. Calls that share the settings rebuild the same corpus, tokenizer
and base (deterministic data and init) and write their rows to `--out-dir` (default `$OUT`);
`python -m benchmarks.upcycling_report` merges them. `--tiny` runs the whole pipeline on a CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks import upcycling_corpus
from benchmarks.record import ResultFile
from benchmarks.upcycling_metrics import Curve, expert_load, parameter_counts
from benchmarks.upcycling_training import MasterAdamW, Schedule, Trainer, batches, to_blocks
from benchmarks.upcycling_variants import VARIANTS, dense_model, model_kind, scratch_moe, upcycled_moe

TINY = dict(packages="stdlib", corpus_bytes=1_500_000, vocab_size=512, tokenizer_chars=1_500_000, seq_len=128,
            batch_size=16, hidden_size=64, intermediate_size=192, layers=2, heads=4, pretrain_steps=60,
            continue_steps=40, warmup_steps=6, eval_tokens=16_384, evals=4, device="cpu", dtype="float32",
            lr=3e-3)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks upcycling-quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: stdlib corpus, tiny model, few steps")
    p.add_argument("--runs", default="a0,b0,c0,a1,b1,c1,d0,e0", help="variant letter + seed, comma-separated")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="compute dtype (default bf16 on "
                   "CUDA, float32 on CPU); master weights and optimizer state are float32")
    p.add_argument("--packages", default=",".join(upcycling_corpus.PACKAGES))
    p.add_argument("--corpus-bytes", type=int, default=200_000_000)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer-chars", type=int, default=24_000_000, help="train the tokenizer on about this much")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128, help="sequences per step")
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--intermediate-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--pretrain-steps", type=int, default=None, help="N = steps × batch × seq-len tokens (default: "
                   "sized to --time-budget, else 300)")
    p.add_argument("--continue-steps", type=int, default=None, help="M = steps × batch × seq-len tokens (default: "
                   "--continue-ratio × pre-training steps)")
    p.add_argument("--continue-ratio", type=float, default=1.0, help="M / N when M is not given")
    p.add_argument("--max-epochs", type=float, default=2.0, help="sizing never passes N + M over this many epochs")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=25, help="pre-training warm-up")
    p.add_argument("--rewarm-frac", type=float, default=0.08, help="upcycled runs: LR re-warm-up, fraction of M")
    p.add_argument("--upcycle-lr-scale", type=float, default=1.0, help="upcycled runs: peak LR × this")
    p.add_argument("--cooldown-frac", type=float, default=0.3, help="linear decay to 0 over this fraction of M")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.01, help="MoE load-balancing loss coefficient")
    p.add_argument("--eval-tokens", type=int, default=262_144, help="held-out tokens per evaluation")
    p.add_argument("--evals", type=int, default=6, help="evaluations per phase (plus one at the start of M)")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; skip runs predicted not to finish "
                   "(and stop one that overruns), 0 = no limit")
    p.add_argument("--out-dir", default=os.environ.get("OUT"), help="write the rows there too (default $OUT)")
    p.add_argument("--tag", default="", help="name of this call's results file (upcycling-quality-<tag>.jsonl)")
    args = p.parse_args()
    if args.tiny:
        defaults = {a.dest: a.default for a in p._actions}
        for name, value in TINY.items():
            if getattr(args, name) == defaults[name]:  # explicit flags win over the tiny preset
                setattr(args, name, value)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r[:1] not in VARIANTS or not r[1:].isdigit()]
    if bad or not runs:
        p.error(f"--runs {args.runs!r}: expected comma-separated ids such as a0,b1 (a variant letter in "
                f"{''.join(VARIANTS)} and a seed); bad: {bad}")
    args.run_ids = runs
    return args


class Study:
    """One call: the data, the sizing, the base, then each requested run, every row recorded as it comes."""

    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.args = args
        self.start = time.time()
        self.dtype = getattr(torch, args.dtype)
        self.tokens_per_step = args.batch_size * args.seq_len
        self.work = work  # checkpoints: the base and each upcycled model
        self.moe_dir = os.path.join(work, "moe")  # where each upcycled model is written, then loaded from
        self.rates: dict[str, float] = {}
        self.rows: list[dict] = []
        path = None
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            path = os.path.join(args.out_dir, f"upcycling-quality{'-' + args.tag if args.tag else ''}.jsonl")
        self.results = ResultFile(__name__, path)

    def emit(self, row: dict) -> None:
        self.rows.append(row)
        self.results.write(row)
        print("UPQ " + json.dumps(row, separators=(",", ":")), flush=True)

    def log(self, text: str) -> None:
        print(f"[{time.time() - self.start:6.0f}s] {text}", flush=True)

    def left(self) -> float:
        return self.args.time_budget - (time.time() - self.start) if self.args.time_budget else math.inf

    # data ------------------------------------------------------------------------------------------------------
    def build_data(self) -> None:
        a = self.args
        corpus = upcycling_corpus.build(tuple(a.packages.split(",")), a.corpus_bytes, a.vocab_size,
                                        a.tokenizer_chars)
        self.vocab_size = corpus.tokenizer.get_vocab_size()
        self.eos = corpus.tokenizer.token_to_id(upcycling_corpus.EOS)
        self.train_blocks = to_blocks(corpus.train, a.seq_len, a.device)
        heldout = to_blocks(corpus.heldout, a.seq_len, a.device)
        count = min(heldout.shape[0], max(1, a.eval_tokens // a.seq_len))
        pick = np.linspace(0, heldout.shape[0] - 1, count).round().astype(np.int64)
        self.eval_blocks = heldout[torch.from_numpy(pick).to(heldout.device)]
        corpus.info.update(eval_tokens=int(self.eval_blocks.numel()), train_blocks=int(self.train_blocks.shape[0]))
        self.corpus_info = corpus.info
        self.train_tokens = corpus.train.size
        self.trainer = Trainer(a.device, a.batch_size, self.tokens_per_step, self.eval_blocks, self.log, self.left)
        self.log(f"corpus: {corpus.info['train_files']} train / {corpus.info['heldout_files']} held-out files, "
                 f"{corpus.train.size:,} train tokens, vocab {self.vocab_size}")

    def size_steps(self) -> None:
        """Fix N and M: as given, or the largest that lets every requested run finish within the time budget."""
        a = self.args
        if not a.pretrain_steps and a.time_budget:
            per_step = self.probe()
            kinds = [model_kind(r[0]) for r in a.run_ids]
            # seconds per pre-training step, counting each run's share at M = ratio × N (e trains N + M)
            cost = per_step["dense"] + sum(per_step[k] * (a.continue_ratio + (r[0] == "e"))
                                           for k, r in zip(kinds, a.run_ids))
            evals = (a.evals + (a.evals + 1) * len(a.run_ids) + a.evals * sum(r[0] == "e" for r in a.run_ids))
            eval_s = evals * a.eval_tokens / self.tokens_per_step * max(per_step.values()) / 3
            overhead = 6.0 * len(a.run_ids) + 10  # conversions, loading, expert-load pass, final rows
            spare = self.left() - eval_s - overhead
            a.pretrain_steps = max(10, int(spare / (cost * 1.1)))
            most = int(a.max_epochs * self.train_tokens / ((1 + a.continue_ratio) * self.tokens_per_step))
            if a.pretrain_steps > most:
                self.log(f"sizing: {a.pretrain_steps} steps would be more than {a.max_epochs} epochs; using {most}")
                a.pretrain_steps = most
            self.log(f"sizing: s/step {json.dumps({k: round(v, 4) for k, v in per_step.items()})}, "
                     f"{evals} evaluations ~{eval_s:.0f} s, {self.left():.0f} s left -> {a.pretrain_steps} "
                     f"pre-training steps")
            self.probe_rates = per_step
        a.pretrain_steps = a.pretrain_steps or 300
        a.continue_steps = a.continue_steps or max(1, round(a.continue_ratio * a.pretrain_steps))

    def probe(self) -> dict[str, float]:
        """Seconds per training step of the dense model, the upcycled 8x top-2 and the virtual-group model."""
        a = self.args
        torch.manual_seed(0)
        model = dense_model(a, self.vocab_size, self.eos)
        self.base_dir = os.path.join(self.work, "probe")
        model.save_pretrained(self.base_dir)
        data = batches(self.train_blocks, a.batch_size, seed=7)
        per_step = {}
        for kind, variant in (("dense", None), ("moe", VARIANTS["b"]), ("moe-fine", VARIANTS["d"])):
            if variant is not None:
                model = upcycled_moe(self.base_dir, self.moe_dir, variant, 0, a.aux_coef)[0]
            model = model.to(a.device)
            opt = MasterAdamW(model, a, self.dtype)
            timings = []
            for _ in range(6):
                self.sync()
                t0 = time.time()
                x = next(data)
                model(input_ids=x, labels=x, use_cache=False).loss.backward()
                opt.step(a.lr * 0.1)
                self.sync()
                timings.append(time.time() - t0)
            per_step[kind] = statistics.median(timings[2:])
            del model, opt
        return per_step

    def sync(self) -> None:
        if self.args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def device_name(self) -> str:
        if self.args.device.startswith("cuda"):
            return torch.cuda.get_device_name(self.args.device)
        return platform.processor() or "cpu"

    # runs ------------------------------------------------------------------------------------------------------
    def emit_setup(self) -> None:
        a = self.args
        n, m = (a.pretrain_steps * self.tokens_per_step, a.continue_steps * self.tokens_per_step)
        self.log(f"N = {n:,} tokens ({a.pretrain_steps} steps), M = {m:,} tokens ({a.continue_steps} steps); N + M = "
                 f"{(n + m) / max(1, self.train_tokens):.2f} epochs of the train split")
        self.emit({"kind": "setup", "args": {k: v for k, v in vars(a).items() if k != "run_ids"},
                   "corpus": self.corpus_info, "device": self.device_name(), "torch": torch.__version__,
                   "transformers": __import__("transformers").__version__, "python": platform.python_version(),
                   "tokens_per_step": self.tokens_per_step, "probe_s_per_step": getattr(self, "probe_rates", None),
                   "setup_s": round(time.time() - self.start)})

    def peak_memory(self) -> float | None:
        """GiB allocated at the peak of the run, above what was allocated before it (the token stream, the base)."""
        if not self.args.device.startswith("cuda"):
            return None
        return round((torch.cuda.max_memory_allocated(self.args.device) - self.memory_before) / 2**30, 3)

    def reset_memory(self) -> None:
        if self.args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.args.device)
            self.memory_before = torch.cuda.memory_allocated(self.args.device)

    def eval_points(self, first: int, steps: int) -> set[int]:
        n = self.args.evals
        return {first + round(steps * i / n) for i in range(n)}

    def pretrain(self) -> None:
        a = self.args
        torch.manual_seed(0)
        self.reset_memory()
        model = dense_model(a, self.vocab_size, self.eos).to(a.device)
        opt = MasterAdamW(model, a, self.dtype)
        self.pretrain_lr = Schedule(a.lr, a.warmup_steps, a.pretrain_steps, 0)
        curve = Curve()
        data = batches(self.train_blocks, a.batch_size, seed=12345)
        stats = self.trainer.train(model, opt, data, range(a.pretrain_steps), self.pretrain_lr,
                                   self.eval_points(0, a.pretrain_steps) - {0}, curve, "base")
        self.rates["dense"] = stats["tokens_per_s"] or 1.0
        self.base_dir = os.path.join(self.work, "base")
        model.save_pretrained(self.base_dir, state_dict=opt.state_dict_fp32())
        self.base_snapshot = opt.snapshot()
        total, active = parameter_counts(model)
        self.emit({"kind": "base", "curve": curve.points, "heldout": curve.points[-1][1], "params_total": total,
                   "params_active": active, "peak_mem_gib": self.peak_memory(), "time_s": round(time.time() -
                   self.start), **stats})
        del model, opt

    def run(self, run_id: str) -> None:
        a = self.args
        key, seed = run_id[0], int(run_id[1:])
        variant = VARIANTS[key]
        P, C = a.pretrain_steps, a.continue_steps
        steps = range(P + C) if variant.scratch else range(P, P + C)
        kind = model_kind(key)
        probed = getattr(self, "probe_rates", None)
        if kind in self.rates:
            rate = self.rates[kind]
        elif probed:
            rate = self.tokens_per_step / probed[kind]
        else:
            rate = self.rates.get("moe", self.rates["dense"] / 3) * (0.8 if key == "d" else 1)
        predicted = len(steps) * self.tokens_per_step / rate * 1.15 + 20
        if predicted > self.left():
            self.log(f"{run_id}: skipped, predicted {predicted:.0f} s > {self.left():.0f} s left")
            self.emit({"kind": "run", "run": run_id, "variant": key, "seed": seed, "label": variant.label,
                       "skipped": f"predicted {predicted:.0f} s, {self.left():.0f} s left"})
            return
        started = time.time()
        torch.manual_seed(seed)
        self.reset_memory()
        extra: dict = {}
        cool = round(a.cooldown_frac * C)
        if key == "a":
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32).to(a.device)
            opt = MasterAdamW(model, a, self.dtype)
            opt.restore(self.base_snapshot)
            lr = Schedule(a.lr, 0, C, cool, offset=P, before=self.pretrain_lr)
        elif variant.scratch:
            torch.manual_seed(100 + seed)
            model = scratch_moe(self.base_dir, a.aux_coef).to(a.device)
            opt = MasterAdamW(model, a, self.dtype)
            lr = Schedule(a.lr, 0, C, cool, offset=P, before=self.pretrain_lr)
        else:
            model, result = upcycled_moe(self.base_dir, self.moe_dir, variant, seed, a.aux_coef)
            model = model.to(a.device)
            opt = MasterAdamW(model, a, self.dtype)
            lr = Schedule(a.lr * a.upcycle_lr_scale, round(a.rewarm_frac * C), C, cool, offset=P,
                          before=self.pretrain_lr)
            extra["function_preserving"] = result.function_preserving
        curve = Curve()
        if variant.scratch:  # the pre-training stream, then the continuation stream of this seed
            pre = batches(self.train_blocks, a.batch_size, seed=12345)
            cont = batches(self.train_blocks, a.batch_size, seed=1000 + seed)
            data = (next(pre) if i < P else next(cont) for i in range(P + C))
            eval_at = (self.eval_points(0, P) - {0}) | self.eval_points(P, C)
        else:
            data = batches(self.train_blocks, a.batch_size, seed=1000 + seed)
            eval_at = self.eval_points(P, C)
        stats = self.trainer.train(model, opt, data, steps, lr, eval_at, curve, run_id)
        if kind != "dense":
            self.rates.setdefault(kind, stats["tokens_per_s"] or 1.0)
            extra["max_expert_load"] = expert_load(model, self.eval_blocks[: a.batch_size])
            extra["router_aux_loss_coef"] = model.config.router_aux_loss_coef
        total, active = parameter_counts(model)
        self.emit({"kind": "run", "run": run_id, "variant": key, "seed": seed, "label": variant.label,
                   "curve": curve.points, "heldout": curve.points[-1][1], "params_total": total,
                   "params_active": active, "peak_mem_gib": self.peak_memory(), "time_s": round(time.time() - started),
                   "lr_peak": lr.peak, "lr_rewarm_steps": lr.warmup, "cooldown_steps": cool, **stats, **extra})
        del model, opt


def main() -> None:
    args = parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="upcycling-quality-") as work:
        run_study(args, work)


def run_study(args: argparse.Namespace, work: str) -> None:
    study = Study(args, work)
    study.log(f"runs {','.join(args.run_ids)} on {args.device} ({args.dtype})")
    with study.results:
        study.build_data()
        study.size_steps()
        study.emit_setup()
        study.pretrain()
        for run_id in args.run_ids:
            study.run(run_id)
    study.log("done; summary (run, held-out loss, tokens/s, peak GiB, active/total params):")
    for row in study.rows:
        if row["kind"] in ("base", "run") and "heldout" in row:
            print(f"UPQ-SUMMARY {row.get('run', 'base')} {row['heldout']:.4f} {row['tokens_per_s']} "
                  f"{row['peak_mem_gib']} {row['params_active']}/{row['params_total']}"
                  + (" incomplete" if row.get("incomplete") else ""), flush=True)


if __name__ == "__main__":
    main()
