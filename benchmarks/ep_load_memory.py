"""Peak host memory of loading a checkpoint under expert parallelism vs the whole model in one process (CPU).

Writes a checkpoint whose weights are mostly experts (4 MoE layers x 32 experts, H 512, I 1024: 0.8 GB in fp32),
then measures, in fresh processes, the growth of peak RSS while loading it and reading every weight once
(transformers may leave weights memory-mapped, resident only once touched): one process with
`from_pretrained(path)`, and P = 2 and 4 processes (torchrun, gloo) with `from_pretrained(path,
expert_parallel_size=P)`, where each rank reads only its E/P experts' slices.

    python -m benchmarks ep-load-memory      # launches its own processes (torchrun for P > 1), ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from .record import ResultFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not `ru_maxrss`: that one starts at the parent's peak at fork."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure(path: str, ep_size: int) -> None:
    """Child process: print this rank's peak-RSS growth (MiB) over the load as one JSON line."""
    import hf_moe

    if ep_size > 1:
        from hf_moe.parallel import init_expert_parallel

        init_expert_parallel(ep_size)  # process groups first, so that their cost is not counted as loading
    before = peak_rss_mib()
    kwargs = {"expert_parallel_size": ep_size} if ep_size > 1 else {}
    model = hf_moe.HfMoeForCausalLM.from_pretrained(path, **kwargs)
    with torch.no_grad():  # touch every weight: a memory-mapped tensor is resident only once read
        for p in model.parameters():
            p.sum()
    after = peak_rss_mib()
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    rank = int(os.environ.get("RANK", "0"))
    print("MEM " + json.dumps({"P": ep_size, "rank": rank, "peak_rss_growth_mib": after - before,
                               "weights_held_mib": params}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "P"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(1)
        measure(args.child[0], int(args.child[1]))
        return
    import hf_moe

    with tempfile.TemporaryDirectory() as tmp:
        config = hf_moe.HfMoeConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                    num_attention_heads=8, num_experts=32, num_experts_per_tok=4)
        model = hf_moe.HfMoeForCausalLM(config)
        total = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        model.save_pretrained(tmp)
        del model
        print(f"checkpoint: {total:.0f} MiB of fp32 weights", flush=True)
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        rows = []
        for ep_size in (1, 2, 4):
            launcher = [sys.executable] if ep_size == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ep_size)]
            out = subprocess.run([*launcher, "-m", "benchmarks", "ep-load-memory", "--child", tmp, str(ep_size)],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
            found = [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("MEM ")]
            if out.returncode or not found:
                raise RuntimeError(out.stderr[-3000:])
            rows.append((ep_size, max(r["peak_rss_growth_mib"] for r in found), found[0]["weights_held_mib"]))
        print(f"{'P':>3} {'peak RSS growth / rank (MiB)':>30} {'weights held / rank (MiB)':>27} {'vs P=1':>8}")
        with ResultFile(__name__) as results:
            for ep_size, peak, held in rows:
                print(f"{ep_size:>3} {peak:>30.0f} {held:>27.0f} {peak / rows[0][1]:>8.2f}")
                results.write({"P": ep_size, "checkpoint_mib": total, "peak_rss_growth_mib_per_rank": peak,
                               "weights_held_mib_per_rank": held, "vs_one_process": peak / rows[0][1]})


if __name__ == "__main__":
    main()
