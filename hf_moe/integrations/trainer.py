"""`MoETrainerCallback`: router metrics in the Trainer's logs, and MoE bookkeeping at the right step boundary."""

from __future__ import annotations

import gc

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback

from ..moe.block import RoutingRecord, moe_blocks
from ..moe.experts import base_layer
from ..moe.metrics import experts_used_fraction, max_over_mean_load, routing_entropy
from ..parallel import checkpoint_optimizer_as_all_experts, expert_parallel_groups, finish_gradients
from ..parallel.balancing import update_expert_bias


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a gradient-checkpointing recompute of the forward)."""
    return torch._C._current_graph_task_id() != -1


class _RouterStats:
    """Router statistics of one MoE layer, summed on the device since the last log, each term as
    `hf_moe.router_metrics` defines it. The sums live in tensors allocated once and updated in place: no host sync
    per step, and under torch.compile (`Trainer(torch_compile=True)`) nothing to guard on or to break the graph at."""

    def __init__(self, num_experts: int, device: torch.device) -> None:
        self.tokens_per_expert = torch.zeros(num_experts, device=device)
        self.totals = torch.zeros(4, device=device)  # forwards, aux loss, z-loss, routing entropy

    def reset(self) -> None:
        self.tokens_per_expert.zero_()
        self.totals.zero_()

    def add(self, routing) -> None:
        with torch.no_grad():
            self.tokens_per_expert += routing.tokens_per_expert
            terms = (routing.aux_loss, routing.z_loss, routing_entropy(routing))
            self.totals += torch.stack([torch.ones_like(terms[0]), *terms]).to(self.totals.dtype)


class MoETrainerCallback(TrainerCallback):
    """Logs router behaviour into the Trainer's logs, so `report_to` (tensorboard, wandb, ...) records it.

    Per logging interval it adds, averaged over the training forwards since the last log:
    `moe/aux_loss`, `moe/z_loss` (mean over MoE layers, unscaled), `moe/max_load` (the worst layer's
    max/mean tokens per expert; 1.0 is perfect balance), `moe/worst_layer`, `moe/mean_max_load`,
    `moe/routing_entropy`, `moe/experts_used` (fraction of experts that received any token), and with
    `per_layer=True` the load of every layer (`moe/layer_<i>/max_load`).

    Usage: `Trainer(..., callbacks=[MoETrainerCallback()])` or `trainer.add_callback(MoETrainerCallback())`.
    transformers calls callbacks in order and puts its printer and reporters first; this callback moves itself
    to the front at the start of training so the metrics it adds reach them.

    Aux-loss-free balancing: when the routers have an `expert_bias` (`HfMoeConfig(use_expert_bias=True)`), the
    callback calls `hf_moe.update_expert_bias` once per optimizer step (after it), so selection counts accumulate
    over the step's micro-batches; `expert_bias_update_rate` overrides the config's rate. The biases are buffers,
    so Trainer checkpoints save them and `resume_from_checkpoint` restores them exactly.

    Expert parallelism: with a model loaded with `expert_parallel_size`, the Trainer's own clipping would use a
    per-rank norm and would skip the expert-gradient sync. The callback then turns the Trainer's clipping off
    (`max_grad_norm` → 0) and, before every optimizer step, syncs expert gradients and clips by the global norm
    with the `max_grad_norm` you set (`hf_moe.parallel.finish_gradients`). Under FSDP2 (`hf_moe.fully_shard_moe(
    trainer.model, trainer.accelerator)` after building the Trainer, with `fsdp_config={"fsdp_version": 2, ...}`),
    the same holds, and the Trainer's optimizer checkpoints its expert state as all E experts.
    """

    def __init__(self, per_layer: bool = False, expert_bias_update_rate: float | None = None) -> None:
        self.per_layer = per_layer
        self.expert_bias_update_rate = expert_bias_update_rate
        self._stats: list[_RouterStats] = []
        self._hooks: list = []
        self._expert_parallel_max_norm: float | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, **kwargs) -> None:
        self._run_first()
        blocks = moe_blocks(model) if model is not None else []
        if model is not None and expert_parallel_groups(model) is not None:
            self._expert_parallel_max_norm = args.max_grad_norm
            args.max_grad_norm = 0.0
            if kwargs.get("optimizer") is not None:  # under FSDP, its expert state checkpoints as all E experts
                checkpoint_optimizer_as_all_experts(model, kwargs["optimizer"])
        self._stats = [_RouterStats(base_layer(block.router).num_experts, next(block.parameters()).device)
                       for block in blocks]
        self._hooks = [block.routing.register_forward_hook(self._record(stats, block))
                       for block, stats in zip(blocks, self._stats)]

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: nn.Module | None = None, **kwargs) -> None:
        if self._expert_parallel_max_norm is not None and model is not None:
            finish_gradients(model, max_norm=self._expert_parallel_max_norm)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs) -> None:
        if model is not None and any(getattr(b.router, "expert_bias", None) is not None for b in moe_blocks(model)):
            update_expert_bias(model, self.expert_bias_update_rate)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._expert_parallel_max_norm is not None:
            args.max_grad_norm = self._expert_parallel_max_norm

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict | None = None, **kwargs) -> None:
        if logs is None or "loss" not in logs or not self._stats or self._stats[0].totals[0].item() == 0:
            return
        metrics = self.metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        for stats in self._stats:
            stats.reset()

    def metrics(self) -> dict[str, float]:
        """Router metrics since the last log, as plain floats (one host sync)."""
        loads, used = [], []
        for stats in self._stats:  # over the interval's summed counts
            loads.append(max_over_mean_load(stats.tokens_per_expert))
            used.append(experts_used_fraction(stats.tokens_per_expert))
        totals = torch.stack([s.totals for s in self._stats]).t()
        means = totals[1:] / totals[0]  # aux loss, z-loss, entropy per forward
        table = torch.cat([torch.stack([torch.stack(loads), torch.stack(used)]).float(), means]).cpu()
        load, used_fraction, aux, z, entropy = table
        worst = int(load.argmax())
        metrics = {
            "moe/aux_loss": aux.mean().item(),
            "moe/z_loss": z.mean().item(),
            "moe/max_load": load[worst].item(),
            "moe/worst_layer": float(worst),
            "moe/mean_max_load": load.mean().item(),
            "moe/routing_entropy": entropy.mean().item(),
            "moe/experts_used": used_fraction.mean().item(),
        }
        if self.per_layer:
            metrics.update({f"moe/layer_{i}/max_load": value.item() for i, value in enumerate(load)})
        return metrics

    @staticmethod
    def _record(stats: _RouterStats, block: nn.Module):
        # A compiled forward is never re-run by a backward (a compiled checkpoint recomputes inside the compiled
        # backward, without this hook), so the backward check is for eager mode, where torch.compile could not trace it.
        def hook(module: RoutingRecord, inputs, output) -> None:
            if block.training and (torch.compiler.is_compiling() or not _in_backward()):
                stats.add(output)

        return hook

    def _run_first(self) -> None:
        """Move this callback to the front of the Trainer's callback list (see the class docstring)."""
        for referrer in gc.get_referrers(self):
            if isinstance(referrer, list) and any(isinstance(c, DefaultFlowCallback) for c in referrer):
                referrer.remove(self)
                referrer.insert(0, self)
                return
