"""Peer: transformers' native expert parallelism (`DistributedConfig(ep_size=W, fsdp_size=W)`, transformers >= 5.21).

The same model shape and step as `ep-scaling --mode model`: a 2-layer Qwen3-MoE at Qwen3-30B-A3B's MoE shape
(H 2048, I 768, E 128, k 8, 32 heads, 4 KV heads, vocabulary 2048), bf16, `grouped_mm` experts, forward + backward of
8192 tokens per GPU in sequences of 2048. W = 1 loads on one GPU without a distributed config.

    python -m benchmarks ep-peer build /tmp/peer      # once (builds on the GPU, saves bf16)
    python -m benchmarks ep-peer run /tmp/peer        # W = 1
    torchrun --nproc_per_node 2 -m benchmarks ep-peer run /tmp/peer

It needs a transformers with `transformers.distributed.DistributedConfig` (>= 5.21): `benchmarks/gpu_ep.sh` installs
one from wheels carried in $PEER_WHEELS. The first version of this script is `../shared/bench/peer_ep.py`.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from .record import ResultFile
from .timing import device_times

TOKENS, SEQ = 8192, 2048


def build(path: str) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                            num_experts_per_tok=8, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
                            head_dim=128, vocab_size=2048, norm_topk_prob=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(path)


def run(path: str) -> None:
    from transformers import AutoModelForCausalLM, __version__

    world = int(os.environ.get("WORLD_SIZE", "1"))
    kwargs = {"device_map": "cuda"}
    if world > 1:
        from transformers.distributed import DistributedConfig

        kwargs = {"distributed_config": DistributedConfig(ep_size=world, fsdp_size=world)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="grouped_mm",
                                                 **kwargs)
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device).manual_seed(1000 + rank)
    ids = torch.randint(0, 2048, (TOKENS // SEQ, SEQ), device=device, generator=g)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    seconds = device_times({"": step}, "cuda", reps=10, before_each=dist.barrier if dist.is_initialized() else None)[0][""]
    if rank == 0:
        result = {"peer": f"transformers {__version__} native EP", "P": world, "step_ms": seconds * 1e3,
                  "tokens_per_s_per_gpu": TOKENS / seconds}
        with ResultFile(__name__) as out:
            out.write(result)
        print("RESULT " + json.dumps(result), flush=True)
        print(f"transformers EP P={world}: {seconds * 1e3:.1f} ms/step, {TOKENS / seconds:,.0f} tokens/s/GPU",
              flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["build", "run"], help="build the model once, then run it (under torchrun)")
    parser.add_argument("path", help="where the model is saved / loaded from")
    args = parser.parse_args()
    {"build": build, "run": run}[args.action](args.path)


if __name__ == "__main__":
    main()
