"""Per-rank bytes of parameters, gradients and AdamW state under FSDP2 + expert parallelism at W = 1, 2, 4 (CPU).

A 136M-parameter model (4 MoE layers x 16 experts, H 512, moe I 1024, vocab 32000) is built in each of W processes
(torchrun, gloo), expert-parallelised at P = min(W, 2) and sharded by `hf_moe.fully_shard_moe`; every parameter gets
a gradient and AdamW takes one step, so its moments exist. Counted per rank: the bytes of the local shards of the
parameters, of their gradients and of the optimizer state (what FSDP keeps between steps; not the all-gathered
layer a forward holds for a moment). Expected: ≈ 1/W of W = 1 (small tensors split unevenly over ranks).

    python -m benchmarks fsdp-memory      # launches its own processes, ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from .record import ResultFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of `t` (its shard when `t` is a DTensor)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def measure(ep_size: int) -> None:
    """Child process: print this rank's bytes as one JSON line."""
    import torch.distributed as dist

    import hf_moe
    from hf_moe.parallel import expert_parallelize, init_expert_parallel

    config = hf_moe.HfMoeConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=1024,
                                num_hidden_layers=4, num_attention_heads=8, num_experts=16, num_experts_per_tok=2)
    groups = init_expert_parallel(ep_size, config.num_experts)
    torch.manual_seed(0)
    model = hf_moe.HfMoeForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    model = expert_parallelize(model, groups)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    hf_moe.fully_shard_moe(model, optimizer=optimizer)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    row = {"W": dist.get_world_size(), "P": ep_size, "rank": dist.get_rank(), "parameters": total,
           "param_bytes": sum(local_bytes(p) for p in model.parameters()),
           "grad_bytes": sum(local_bytes(p.grad) for p in model.parameters()),
           "optimizer_bytes": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values())}
    print("MEM " + json.dumps(row), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", type=int, metavar="P", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(1)
        measure(args.child)
        return
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    rows = []
    for world in (1, 2, 4):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
        out = subprocess.run([*launcher, "-m", "benchmarks", "fsdp-memory", "--child", str(min(world, 2))],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        found = [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("MEM ")]
        if out.returncode or len(found) != world:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-3000:])
        rows.append(max(found, key=lambda r: r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]))
    print(f"model: {rows[0]['parameters'] / 1e6:.0f}M parameters, float32, AdamW; the most loaded rank of each run")
    header = f"{'W':>2} {'P':>2} {'params MiB':>11} {'grads MiB':>10} {'AdamW MiB':>10} {'total MiB':>10} {'vs W=1':>7}"
    print(header)
    base = None
    with ResultFile(__name__) as results:
        for row in rows:
            total = row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
            base = base or total
            print(f"{row['W']:>2} {row['P']:>2} {row['param_bytes'] / 2**20:>11.1f} {row['grad_bytes'] / 2**20:>10.1f} "
                  f"{row['optimizer_bytes'] / 2**20:>10.1f} {total / 2**20:>10.1f} {total / base:>7.3f}")
            results.write({**row, "total_bytes": total, "vs_one_process": total / base})


if __name__ == "__main__":
    main()
