"""Worker for the foreign-checkpoint expert-parallel test, launched by torchrun with the gloo backend.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/interop_worker.py WORKDIR

Loads every checkpoint folder under WORKDIR/checkpoints with `expert_parallel_size=2` (each rank reads its half of
the experts), runs this rank's rows of WORKDIR/batch.pt and writes the logits to WORKDIR/ep<rank>.pt.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_moe import HfMoeForCausalLM  # noqa: E402

if __name__ == "__main__":
    workdir = sys.argv[1]
    batch = torch.load(os.path.join(workdir, "batch.pt"))
    logits, experts = {}, {}
    for name in sorted(os.listdir(os.path.join(workdir, "checkpoints"))):
        model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "checkpoints", name), expert_parallel_size=2)
        rank, rows = dist.get_rank(), batch.shape[0] // dist.get_world_size()
        with torch.no_grad():
            logits[name] = model(batch[rank * rows : (rank + 1) * rows].to(model.device)).logits.cpu()
        experts[name] = {n: p.shape[0] for n, p in model.named_parameters() if "experts.gate_up_proj" in n}
    torch.save({"logits": logits, "experts": experts}, os.path.join(workdir, f"ep{dist.get_rank()}.pt"))
    dist.destroy_process_group()
