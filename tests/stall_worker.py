"""Worker for the stalled-rank test, launched by torchrun with the gloo backend on 2 processes.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/stall_worker.py WORKDIR TIMEOUT_S STALL_S

Every rank creates the Accelerator with `InitProcessGroupKwargs(timeout=TIMEOUT_S)`, then loads WORKDIR/model under
expert parallelism (P = 2, `global_aux_loss=False`, so only the expert-parallel groups carry the MoE collectives).
Rank 1 sleeps STALL_S seconds inside the first MoE layer's forward. Rank 0 writes what its forward ended with (the
error, or "finished") and how long it took to WORKDIR/rank0.json, then exits non-zero on an error, which ends the job.
"""

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_moe import HfMoeForCausalLM  # noqa: E402

if __name__ == "__main__":
    workdir, timeout_s, stall_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo",
                                                                  timeout=timedelta(seconds=timeout_s))])
    model = HfMoeForCausalLM.from_pretrained(os.path.join(workdir, "model"), expert_parallel_size=2,
                                             global_aux_loss=False).eval()
    rank = dist.get_rank()
    if rank == 1:
        first_router = next(m for n, m in model.named_modules() if n.endswith("mlp.router"))
        first_router.register_forward_pre_hook(lambda *_: time.sleep(stall_s))
    ids = torch.randint(1, 97, (2, 8))
    dist.barrier()  # both ranks enter the forward together: the clock measures the stall alone
    start = time.monotonic()
    try:
        with torch.no_grad():
            model(ids)
        outcome = "finished"
    except Exception as error:  # the collective's timeout: record it, then fail the job
        outcome = f"{type(error).__name__}: {error}"
    if rank == 0:
        with open(os.path.join(workdir, "rank0.json"), "w") as f:
            json.dump({"outcome": outcome, "seconds": time.monotonic() - start}, f)
    sys.exit(0 if outcome == "finished" else 1)
