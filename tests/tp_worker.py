"""Worker for the tensor-parallel test, launched by torchrun with the gloo backend.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/tp_worker.py WORKDIR

Loads WORKDIR/model with transformers' own tensor parallelism (`tp_plan="auto"`), then for each experts
implementation runs WORKDIR/batch.pt forward and backward in training mode (labels, load-balancing and z losses);
writes each parameter's layout and local shard, the logits, the loss and the whole gradients (DTensors gathered; none
for parameters without one, as a sparse attention indexer) to
WORKDIR/tp<rank>.pt, and saves the model back to WORKDIR/saved.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_moe import HfMoeForCausalLM  # noqa: E402

IMPLEMENTATIONS = ("hf_moe_grouped", "eager")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor on every rank: a DTensor's shards gathered (a collective: every rank calls it in order)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def main(workdir: str) -> None:
    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), tp_plan="auto")
    rank = dist.get_rank()
    result = {
        "world": dist.get_world_size(),
        "sharded": sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor)),
        "local": {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
                  for n, p in model.named_parameters()},
    }
    batch = torch.load(os.path.join(workdir, "batch.pt"))
    model.train()
    for implementation in IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        out = model(batch, labels=batch)
        out.loss.backward()
        result[implementation] = {
            "logits": out.logits.detach().clone(),
            "loss": out.loss.detach().clone(),
            "grads": {n: whole(p.grad) for n, p in model.named_parameters() if p.grad is not None},
        }
    model.save_pretrained(os.path.join(workdir, "saved"))
    torch.save(result, os.path.join(workdir, f"tp{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
