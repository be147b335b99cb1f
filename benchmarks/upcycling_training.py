"""How every `upcycling-quality` run trains: AdamW on float32 master weights, the learning-rate schedule, the batch
stream over token blocks, and the loop that trains and evaluates."""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.upcycling_metrics import Curve, heldout_loss


class MasterAdamW:
    """AdamW on float32 master copies of a model's parameters; the model computes in its own (bf16) dtype."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, dtype: torch.dtype) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.masters = [p.detach().float().clone() for _, p in named]
        with torch.no_grad():  # parameters only: buffers such as RoPE's inverse frequencies stay float32
            for _, p in named:
                p.data = p.data.to(dtype)
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        decay = [m for m in self.masters if m.dim() >= 2]
        no_decay = [m for m in self.masters if m.dim() < 2]
        fused = self.masters[0].is_cuda
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def step(self, lr: float, clip: float = 1.0) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
            p.grad = None
        torch.nn.utils.clip_grad_norm_(self.masters, clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters):
                p.copy_(m)
                m.grad = None

    def snapshot(self) -> dict:
        return {"masters": [m.detach().clone() for m in self.masters], "opt": copy.deepcopy(self.opt.state_dict())}

    def restore(self, snap: dict) -> None:
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.masters, snap["masters"]):
                m.copy_(saved)
                p.copy_(saved)
        self.opt.load_state_dict(copy.deepcopy(snap["opt"]))

    def state_dict_fp32(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().cpu().contiguous() for n, m in zip(self.names, self.masters)}


def batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Batches of `blocks` in an order that depends only on `seed`: a fresh permutation every epoch."""
    pending = np.zeros(0, dtype=np.int64)
    epoch = 0
    while True:
        while pending.size < batch_size:
            perm = np.random.default_rng([seed, epoch]).permutation(blocks.shape[0])
            pending, epoch = np.concatenate([pending, perm]), epoch + 1
        idx, pending = pending[:batch_size], pending[batch_size:]
        yield blocks[torch.from_numpy(idx).to(blocks.device)]


def to_blocks(tokens: np.ndarray, seq_len: int, device: str) -> torch.Tensor:
    """The token stream as `[n, seq_len]` blocks on `device`; the tail too short for a block is dropped."""
    n = tokens.size // seq_len
    return torch.from_numpy(tokens[: n * seq_len].astype(np.int64)).view(n, seq_len).to(device)


@dataclass
class Schedule:
    """Learning rate by step: linear warm-up to `peak`, constant, linear decay to 0 over the last `cooldown` steps."""

    peak: float
    warmup: int
    steps: int
    cooldown: int
    offset: int = 0  # this many steps of the run ran under `before` (the pre-training schedule for e)
    before: Callable[[int], float] | None = None

    def __call__(self, step: int) -> float:
        if step < self.offset:
            return self.before(step)
        step -= self.offset
        lr = self.peak * min(1.0, (step + 1) / self.warmup) if self.warmup else self.peak
        if step >= self.steps - self.cooldown:
            lr *= (self.steps - step) / self.cooldown
        return lr


@dataclass
class Trainer:
    """The loop of every run: held-out loss on `eval_blocks` at the steps asked for, tokens/s over the timed steps,
    and a stop once `left()` (seconds of the time budget) goes below zero."""

    device: str
    batch_size: int
    tokens_per_step: int
    eval_blocks: torch.Tensor
    log: Callable[[str], None]
    left: Callable[[], float]

    def train(self, model, opt: MasterAdamW, data: Iterator[torch.Tensor], steps: range, lr: Callable[[int], float],
              eval_at: set[int], curve: Curve, key: str) -> dict:
        """Train over `steps` (global step numbers), evaluating before each step in `eval_at` and after the last."""
        coef_aux = getattr(model.config, "router_aux_loss_coef", 0.0)
        coef_z = getattr(model.config, "router_z_loss_coef", 0.0)
        train_sum = torch.zeros((), device=self.device)
        train_count, timed_tokens, timed = 0, 0, 0.0
        warm = min(3, len(steps) - 1)  # the first steps (allocator, kernel caches) are not timed
        stopped = False
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)

        def evaluate(step: int) -> None:
            mean = (train_sum / train_count).item() if train_count else None
            loss = heldout_loss(model, self.eval_blocks, self.batch_size)
            curve.points.append([step * self.tokens_per_step, round(loss, 5), None if mean is None else round(mean, 5)])
            self.log(f"{key} step {step}: held-out {loss:.4f}" + ("" if mean is None else f", train {mean:.4f}"))

        t0 = None
        for i, step in enumerate(steps):
            if step in eval_at:
                if t0 is not None:
                    sync()
                    timed, t0 = timed + time.time() - t0, None
                evaluate(step)
                train_sum.zero_()
                train_count = 0
            if t0 is None and i >= warm:
                sync()
                t0 = time.time()
            x = next(data)
            out = model(input_ids=x, labels=x, use_cache=False)
            out.loss.backward()
            opt.step(lr(step))
            with torch.no_grad():
                lm = out.loss.detach()
                if getattr(out, "aux_loss", None) is not None:
                    lm = lm - coef_aux * out.aux_loss.detach() - coef_z * out.z_loss.detach()
                train_sum += lm
            train_count += 1
            timed_tokens += self.tokens_per_step if i >= warm else 0
            if self.left() < 0:
                stopped = True
                self.log(f"{key}: time budget reached at step {step}, stopping")
                break
        sync()
        if t0 is not None:
            timed += time.time() - t0
        evaluate(step + 1)
        return {"tokens_per_s": round(timed_tokens / timed) if timed > 0 else None, "incomplete": stopped}

