"""Runs one optimizer step of the transformers Trainer on a tiny hf-moe model and records what the aux-loss
test needs: the micro-batches each process saw and the router-weight gradients with and without router losses.

In-process: `run_step(...)`. Under torchrun: `python -m torch.distributed.run --nproc_per_node 2
tests/trainer_worker.py OUT GA BATCH` writes OUT.<rank>.pt.
"""

import os
import sys
import tempfile

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_moe import HfMoeForCausalLM, fully_shard_moe  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

AUX, Z = 0.5, 0.25
SAMPLES, LENGTH = 8, 10


def dataset(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (SAMPLES, LENGTH), generator=g)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def model(seed: int, aux: float, z: float) -> HfMoeForCausalLM:
    torch.manual_seed(seed)
    return HfMoeForCausalLM(tiny_config(router_aux_loss_coef=aux, router_z_loss_coef=z))


class _Capture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = [p.grad.detach().clone() for n, p in model.named_parameters() if n.endswith("router.weight")]


def run_step(seed: int, grad_accum: int, batch_size: int, aux: float, z: float) -> tuple[list, list]:
    """One Trainer optimizer step; returns (router grads, micro-batches this process saw)."""
    net = model(seed, aux, z)
    seen = []
    net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    capture = _Capture()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
            max_steps=1, learning_rate=1e-3, max_grad_norm=0.0, report_to=[], save_strategy="no",
            use_cpu=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, logging_strategy="no",
            disable_tqdm=True, dataloader_drop_last=True,
        )
        Trainer(model=net, args=args, train_dataset=dataset(seed), callbacks=[capture]).train()
    return capture.grads, seen


def aux_gradient(seed: int, grad_accum: int, batch_size: int) -> tuple[list, list]:
    """Router-weight gradient due to the router losses alone: a step with them minus a step without them."""
    with_aux, seen = run_step(seed, grad_accum, batch_size, AUX, Z)
    without, _ = run_step(seed, grad_accum, batch_size, 0.0, 0.0)
    return [a - b for a, b in zip(with_aux, without)], seen


def expert_parallel_step(out: str, fsdp: bool = False) -> None:
    """One Trainer step with experts sharded over 2 processes; records router and expert grads and new params.
    With `fsdp`, the model is sharded with FSDP2 (`hf_moe.fully_shard_moe` on the Trainer's accelerator) and the
    records hold each weight's and gradient's gathered FSDP shards."""
    from hf_moe.integrations import MoETrainerCallback

    path = os.path.join(os.path.dirname(out), "ckpt")
    net = HfMoeForCausalLM.from_pretrained(path, expert_parallel_size=2)
    seen = []
    net.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    capture = _Capture()
    grads = {}

    class _Grads(TrainerCallback):  # after MoETrainerCallback's sync and clip (callbacks run in order)
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.update({n.removeprefix("module."): full(p.grad).clone() for n, p in model.named_parameters()})

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
            learning_rate=1e-3, max_grad_norm=0.05, report_to=[], save_strategy="no", use_cpu=True,
            ddp_backend="gloo", logging_strategy="no", disable_tqdm=True, dataloader_drop_last=True,
        )
        trainer = Trainer(model=net, args=args, train_dataset=dataset(1234),
                          callbacks=[MoETrainerCallback(), capture, _Grads()])
        if fsdp:
            _fsdp2(trainer)
            fully_shard_moe(net, trainer.accelerator)
        trainer.train()
    torch.save({"grads": grads, "seen": seen,
                "params": {n: full(p).detach().clone() for n, p in net.named_parameters()}},
               f"{out}.{os.environ['RANK']}.pt")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of an FSDP-sharded tensor (for experts: this rank's experts), `t` itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp2(trainer: Trainer) -> None:
    """accelerate turns FSDP on only for GPU launches: on CPU processes the Trainer's accelerator state is switched
    to FSDP2 after creation (as tests/fsdp_worker.py does), and the Trainer told so."""
    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    PartialState().distributed_type = trainer.accelerator.state.distributed_type = DistributedType.FSDP
    trainer.accelerator.state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


if __name__ == "__main__":
    if sys.argv[2] in ("ep", "fsdp"):
        expert_parallel_step(sys.argv[1], fsdp=sys.argv[2] == "fsdp")
        # Every rank leaves the group together: a rank exiting while gloo's threads still serve the other aborts.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.exit(0)
    out, grad_accum, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    grads, seen = aux_gradient(1234, grad_accum, batch_size)
    torch.save({"grads": grads, "seen": seen}, f"{out}.{os.environ.get('RANK', '0')}.pt")
