"""Peak memory of loading a checkpoint under expert parallelism vs loading the full model, per rank.

    python benchmarks/ep_load_memory.py build /tmp/ep-mem          # writes a ~1.6 GB fp32 MoE checkpoint
    python benchmarks/ep_load_memory.py full /tmp/ep-mem            # one process loads everything
    torchrun --nproc_per_node 4 benchmarks/ep_load_memory.py ep /tmp/ep-mem   # each rank reads E/4 experts
"""

import os
import resource
import sys

import torch

import hf_moe


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(mode: str, path: str) -> None:
    if mode == "build":
        config = hf_moe.HfMoeConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                                    num_hidden_layers=4, num_attention_heads=8, num_experts=64, num_experts_per_tok=4)
        with torch.device("meta"):
            model = hf_moe.HfMoeForCausalLM(config)
        model = model.to_empty(device="cpu")
        for p in model.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        model.save_pretrained(path)
        return
    before = rss_gib()
    if mode == "full":
        model = hf_moe.HfMoeForCausalLM.from_pretrained(path)
    else:
        model = hf_moe.HfMoeForCausalLM.from_pretrained(path, expert_parallel_size=int(os.environ["WORLD_SIZE"]))
    params = sum(p.numel() for p in model.parameters())
    touched = sum(float(p.float().sum()) for p in model.parameters())  # page in memory-mapped weights
    assert touched == touched, "weights must be finite"
    rank = os.environ.get("RANK", "0")
    print(f"{mode} rank {rank}: {params / 1e6:.0f}M parameters held, peak RSS {rss_gib():.2f} GiB "
          f"({rss_gib() - before:.2f} GiB above imports)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
