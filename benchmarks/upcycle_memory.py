"""Peak memory and throughput of streaming upcycling vs. a naive load-everything converter, side by side.

Generates a random Llama-shaped dense checkpoint (about 1B parameters in bf16 by default, sharded with an
index), then converts it twice, each in a fresh process so peak RSS is measured cleanly:

- streaming: `conversions.upcycle` (reads one tensor at a time, writes expert rows straight into the shard);
- naive: load every source tensor, build the whole MoE state dict in memory, save it shard by shard with
  `safetensors.torch.save_file` (what a simple conversion script does).

Both write the same tensors (checked), so the ratios compare like with like. CPU only:

    python -m benchmarks upcycle-memory                      # ~1B source, 4 experts on every other layer
    python -m benchmarks upcycle-memory --layers 4 --hidden 1024 --intermediate 2816   # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .record import ResultFile
from .rss import (
    parse_or_run_child,
    print_table,
    run_child,
    save_in_memory_shards,
    streaming_against_naive,
    suite_parser,
)


def generate(path: Path, args: argparse.Namespace) -> None:
    """A random dense Llama checkpoint written layer by layer into ~1 GB shards with an index."""
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=max(1, args.hidden // 512), tie_word_embeddings=False)
    config.dtype = torch.bfloat16
    path.mkdir(parents=True)
    config.save_pretrained(path)
    H, I, kv = args.hidden, args.intermediate, config.num_key_value_heads * config.head_dim

    def rand(*shape):
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    groups = [{"model.embed_tokens.weight": rand(args.vocab, H)}]
    for i in range(args.layers):
        p = f"model.layers.{i}."
        groups.append({p + "self_attn.q_proj.weight": rand(H, H), p + "self_attn.k_proj.weight": rand(kv, H),
                       p + "self_attn.v_proj.weight": rand(kv, H), p + "self_attn.o_proj.weight": rand(H, H),
                       p + "mlp.gate_proj.weight": rand(I, H), p + "mlp.up_proj.weight": rand(I, H),
                       p + "mlp.down_proj.weight": rand(H, I), p + "input_layernorm.weight": 1 + rand(H),
                       p + "post_attention_layernorm.weight": 1 + rand(H)})
        if sum(t.nbytes for g in groups for t in g.values()) >= 10**9:
            _flush(path, groups)
    groups.append({"model.norm.weight": 1 + rand(H), "lm_head.weight": rand(args.vocab, H)})
    _flush(path, groups, last=True)


_written: dict[str, str] = {}


def _flush(path: Path, groups: list[dict], last: bool = False) -> None:
    from safetensors.torch import save_file

    tensors = {k: v for g in groups for k, v in g.items()}
    name = f"part-{len(set(_written.values())):05d}.safetensors"
    save_file(tensors, path / name, metadata={"format": "pt"})
    _written.update({k: name for k in tensors})
    groups.clear()
    if last:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": _written}))


def naive(src: Path, out: Path, args: argparse.Namespace) -> None:
    """Everything in memory: all source tensors, then the whole MoE state dict, then shard-by-shard save_file."""
    import torch
    from safetensors.torch import load_file

    from conversions.init_methods import router_normal
    from conversions.sources import DenseSource, expected_shapes
    from conversions.upcycling import UpcycleConfig, plan_upcycle, upcycled_config

    source = DenseSource.open(src)
    plan = plan_upcycle(UpcycleConfig(num_experts=args.experts, top_k=args.top_k, moe_layers=args.moe_layers), source)
    config = upcycled_config(source, plan)
    dense = {}
    for file in sorted(src.glob("*.safetensors")):
        dense.update(load_file(file))
    state = {}
    for name in expected_shapes(config):
        if ".mlp." not in name or int(name.split(".")[2]) not in plan.moe_layers:
            state[name] = dense[name]
            continue
        layer, prefix = int(name.split(".")[2]), name.split(".mlp.")[0] + ".mlp."
        if name.endswith("router.weight"):
            state[name] = router_normal(args.experts, config.hidden_size, 1, config.initializer_range, 0,
                                        layer).to(torch.bfloat16)
        elif name.endswith("gate_up_proj"):
            gate_up = torch.cat([dense[prefix + "gate_proj.weight"], dense[prefix + "up_proj.weight"]])
            state[name] = torch.stack([gate_up] * args.experts)
        elif name.endswith("down_proj"):
            state[name] = torch.stack([dense[prefix + "down_proj.weight"]] * args.experts)
    save_in_memory_shards(state, config, out, args.max_shard_size)


def streaming(src: Path, out: Path, args: argparse.Namespace) -> None:
    from conversions import UpcycleConfig, upcycle

    upcycle(src, out, UpcycleConfig(num_experts=args.experts, top_k=args.top_k, moe_layers=args.moe_layers,
                                    max_shard_size=args.max_shard_size, progress=False))


def main() -> None:
    import conversions  # noqa: F401  (a child imports torch and transformers before its baseline)

    parser = suite_parser(__doc__, hidden=2048, layers=20, max_shard_size="2GB")
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-layers", default="every-other")
    steps = {"naive": naive, "streaming": streaming, "generate": lambda src, out, a: generate(out, a)}
    args = parse_or_run_child(parser, steps)
    if args is None:
        return
    argv = sys.argv[1:]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        gen = run_child("upcycle-memory", "generate", tmp, tmp / "dense", argv)
        params = gen["bytes_written"] // 2
        print(f"source: random Llama, {params / 1e9:.2f}B parameters, {gen['bytes_written'] / 1e9:.2f} GB bf16 "
              f"(H={args.hidden}, I={args.intermediate}, {args.layers} layers); upcycling to {args.experts} experts, "
              f"top-{args.top_k}, moe_layers={args.moe_layers}")
        record = ResultFile(__name__)
        record.write({"what": "source", "parameters": params, "hidden": args.hidden, "intermediate": args.intermediate,
                      "layers": args.layers, "experts": args.experts, "top_k": args.top_k,
                      "moe_layers": args.moe_layers})
        results = streaming_against_naive("upcycle-memory", tmp / "dense", tmp, argv, record)
        s, n = results["streaming"], results["naive"]
        print_table(results, write_rate=True)
        print(f"output {s['bytes_written'] / 1e9:.2f} GB; naive / streaming: peak RSS "
              f"{n['peak_rss'] / s['peak_rss']:.1f}x (above imports "
              f"{(n['peak_rss'] - n['baseline_rss']) / max(1, s['peak_rss'] - s['baseline_rss']):.1f}x), "
              f"time {n['seconds'] / s['seconds']:.2f}x")
        record.close()


if __name__ == "__main__":
    main()
