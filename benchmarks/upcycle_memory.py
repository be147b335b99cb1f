"""Peak memory and throughput of streaming upcycling vs a naive load-everything conversion.

Generates a random Llama-shaped dense checkpoint (~1B parameters by default, bf16), then converts it twice, each
in its own process so that peak RSS is measured cleanly:
  * streaming: `conversions.upcycle` (one source tensor and one layer's expert stack at a time);
  * naive: load the whole dense state dict, build the whole MoE state dict, save it (what a simple script does).
Prints peak RSS, wall time and GB/s of output written for both, and their ratios.

    python benchmarks/upcycle_memory.py --workdir /tmp/upcycle-bench            # ~1B parameters
    python benchmarks/upcycle_memory.py --hidden-size 1024 --layers 8          # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig


def generate(path: str, args: argparse.Namespace) -> int:
    """A random bf16 Llama checkpoint written layer by layer (never the whole model in memory)."""
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden_size // 128,
                         num_key_value_heads=max(1, args.hidden_size // 512),
                         tie_word_embeddings=False, dtype="bfloat16")
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    h, i, kv = args.hidden_size, args.intermediate_size, config.num_key_value_heads * 128
    shapes = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (args.vocab_size, h)}
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    weight_map, shard, count, params = {}, {}, 0, 0
    names = list(shapes)
    for n, name in enumerate(names):
        shard[name] = (torch.randn(shapes[name]) * 0.02).to(torch.bfloat16)
        params += shard[name].numel()
        if sum(t.numel() for t in shard.values()) > 250_000_000 or n == len(names) - 1:
            file = f"model-{count:05d}.safetensors"
            save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, count = {}, count + 1
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return params


def naive(source: str, output: str, num_experts: int) -> None:
    """Load everything, build everything, save everything."""
    with open(os.path.join(source, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for file in files:
        state.update(load_file(os.path.join(source, file)))
    moe = {}
    for name, tensor in state.items():
        if ".mlp." not in name:
            moe[name] = tensor
    layers = {int(n.split(".")[2]) for n in state if ".mlp." in n}
    for layer in layers:
        p = f"model.layers.{layer}.mlp."
        gate_up = torch.cat([state[p + "gate_proj.weight"], state[p + "up_proj.weight"]])
        moe[p + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(num_experts, 1, 1)
        moe[p + "experts.down_proj"] = state[p + "down_proj.weight"].unsqueeze(0).repeat(num_experts, 1, 1)
        moe[p + "router.weight"] = torch.randn(num_experts, gate_up.shape[1]).to(gate_up.dtype) * 0.02
    os.makedirs(output, exist_ok=True)
    save_file(moe, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})


def child(mode: str, source: str, output: str, num_experts: int, max_shard_size: str) -> None:
    start = time.time()
    if mode == "streaming":
        from conversions import UpcycleConfig, upcycle

        upcycle(source, output, UpcycleConfig(num_experts=num_experts, top_k=2, max_shard_size=max_shard_size,
                                              overwrite=True))
    else:
        naive(source, output, num_experts)
    seconds = time.time() - start
    written = sum(os.path.getsize(os.path.join(output, f)) for f in os.listdir(output) if f.endswith(".safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss": peak, "written": written}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/hf-moe-upcycle-bench")
    parser.add_argument("--hidden-size", type=int, default=2048)
    parser.add_argument("--intermediate-size", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--max-shard-size", default="1GB", help="shard size of the streaming path's output")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    source = os.path.join(args.workdir, "dense")
    params = generate(source, args)
    print(f"dense checkpoint: {params / 1e9:.2f}B parameters (bf16), {args.layers} layers; upcycling to "
          f"{args.num_experts} experts per layer; streaming output in shards of {args.max_shard_size}")
    results = {}
    for mode in ("streaming", "naive"):
        out = os.path.join(args.workdir, mode)
        proc = subprocess.run([sys.executable, __file__, "--child", mode, source, out, str(args.num_experts),
                               args.max_shard_size],
                              capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        shutil.rmtree(out)
    print(f"\n{'path':<10} {'peak RSS':>10} {'time':>8} {'written':>9} {'GB/s':>6}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['peak_rss'] / 2**30:>8.2f}GiB {r['seconds']:>7.1f}s {r['written'] / 1e9:>7.2f}GB "
              f"{r['written'] / 1e9 / r['seconds']:>6.2f}")
    s, n = results["streaming"], results["naive"]
    print(f"\nstreaming / naive: peak RSS {s['peak_rss'] / n['peak_rss']:.2f}x, "
          f"time {s['seconds'] / n['seconds']:.2f}x")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        main()
