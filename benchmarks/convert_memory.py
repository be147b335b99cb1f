"""Peak memory and time of `conversions.convert` (streaming) vs. a load-everything converter, side by side.

Generates a random Qwen3-MoE checkpoint in the per-expert layout transformers 5 saves (about 1.1B parameters in
bf16 by default, in ~1 GB shards with an index), then converts it to hf-moe's fused layout twice, each in a fresh
process so peak RSS is measured cleanly:

- streaming: `conversions.convert(src, out)` (reads one expert's tensors at a time, writes them straight into the
  shard whose header was laid out first);
- naive: load every source tensor, stack the experts into `gate_up_proj` / `down_proj` in memory, save shard by shard
  with `safetensors.torch.save_file` (what a simple conversion script does).

Both write the same tensors (checked), so the ratios compare like with like. CPU only:

    python -m benchmarks convert-memory                         # ~1.1B parameters
    python -m benchmarks convert-memory --layers 2 --experts 8  # quick
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

SHARD_BYTES = 10**9


def generate(path: Path, args: argparse.Namespace) -> None:
    """A random Qwen3-MoE checkpoint, per-expert tensors, written layer by layer into ~1 GB shards with an index."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    H, I, E, heads, d = args.hidden, args.moe_intermediate, args.experts, args.hidden // 128, 128
    kv = min(4, heads)  # a divisor of the heads (hidden 256 has 2)
    config = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=H, intermediate_size=4 * H, moe_intermediate_size=I,
                            num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv,
                            head_dim=d, num_experts=E, num_experts_per_tok=args.top_k, norm_topk_prob=True)
    config.dtype = torch.bfloat16
    config.architectures = ["Qwen3MoeForCausalLM"]
    path.mkdir(parents=True)
    config.save_pretrained(path)

    def rand(*shape):
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    weight_map, pending = {}, {}

    def flush(last: bool = False) -> None:
        name = f"part-{len(set(weight_map.values())):05d}.safetensors"
        save_file(pending, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(pending, name))
        pending.clear()
        if last:
            (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    pending["model.embed_tokens.weight"] = rand(args.vocab, H)
    for i in range(args.layers):
        p = f"model.layers.{i}."
        pending.update({p + "self_attn.q_proj.weight": rand(heads * d, H), p + "self_attn.k_proj.weight": rand(kv * d, H),
                        p + "self_attn.v_proj.weight": rand(kv * d, H), p + "self_attn.o_proj.weight": rand(H, heads * d),
                        p + "self_attn.q_norm.weight": 1 + rand(d), p + "self_attn.k_norm.weight": 1 + rand(d),
                        p + "input_layernorm.weight": 1 + rand(H), p + "post_attention_layernorm.weight": 1 + rand(H),
                        p + "mlp.gate.weight": rand(E, H)})
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            pending.update({q + "gate_proj.weight": rand(I, H), q + "up_proj.weight": rand(I, H),
                            q + "down_proj.weight": rand(H, I)})
            if sum(t.nbytes for t in pending.values()) >= SHARD_BYTES:
                flush()
    pending.update({"model.norm.weight": 1 + rand(H), "lm_head.weight": rand(args.vocab, H)})
    flush(last=True)


def naive(src: Path, out: Path, args: argparse.Namespace) -> None:
    """Everything in memory: all source tensors, then the whole hf-moe state dict, then shard-by-shard save_file."""
    import re

    import torch
    from safetensors.torch import load_file

    from hf_moe.interop import ForeignCheckpoint

    config = ForeignCheckpoint.open(src).hf_moe_config()
    source = {}
    for file in sorted(src.glob("*.safetensors")):
        source.update(load_file(file))
    state, expert = {}, re.compile(r"(model\.layers\.\d+\.mlp\.)experts\.(\d+)\.(\w+)_proj\.weight")
    for name, tensor in source.items():
        match = expert.fullmatch(name)
        if match is None:
            state[name.replace(".mlp.gate.", ".mlp.router.")] = tensor
    for i in config.moe_layer_indices:
        p = f"model.layers.{i}.mlp."
        state[p + "experts.gate_up_proj"] = torch.stack([
            torch.cat([source[f"{p}experts.{e}.gate_proj.weight"], source[f"{p}experts.{e}.up_proj.weight"]])
            for e in range(config.num_experts)])
        state[p + "experts.down_proj"] = torch.stack([source[f"{p}experts.{e}.down_proj.weight"]
                                                      for e in range(config.num_experts)])
    save_in_memory_shards(state, config, out, args.max_shard_size)


def streaming(src: Path, out: Path, args: argparse.Namespace) -> None:
    from conversions import convert

    convert(src, out, "hf_moe", max_shard_size=args.max_shard_size, progress=False)


def main() -> None:
    import conversions.converting  # noqa: F401  (a child imports torch and transformers before its baseline)

    parser = suite_parser(__doc__, hidden=1024, layers=16, max_shard_size="1GB")
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--experts", type=int, default=40)
    parser.add_argument("--top-k", type=int, default=4)
    steps = {"naive": naive, "streaming": streaming, "generate": lambda src, out, a: generate(out, a)}
    args = parse_or_run_child(parser, steps)
    if args is None:
        return
    argv = sys.argv[1:]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        gen = run_child("convert-memory", "generate", tmp, tmp / "qwen3_moe", argv)
        params = gen["bytes_written"] // 2
        print(f"source: random Qwen3-MoE, {params / 1e9:.2f}B parameters, {gen['bytes_written'] / 1e9:.2f} GB bf16 in "
              f"~{SHARD_BYTES / 1e9:.0f} GB shards (H={args.hidden}, I={args.moe_intermediate}, {args.experts} experts, "
              f"{args.layers} layers); converting per-expert → hf_moe fused, {args.max_shard_size} output shards")
        record = ResultFile(__name__)
        record.write({"what": "source", "parameters": params, "hidden": args.hidden, "layers": args.layers,
                      "experts": args.experts, "moe_intermediate": args.moe_intermediate})
        results = streaming_against_naive("convert-memory", tmp / "qwen3_moe", tmp, argv, record)
        s, n = results["streaming"], results["naive"]
        print_table(results)
        print(f"streaming above imports = {(s['peak_rss'] - s['baseline_rss']) / SHARD_BYTES:.2f} source shards; "
              f"naive / streaming peak RSS {n['peak_rss'] / s['peak_rss']:.1f}x, time {n['seconds'] / s['seconds']:.2f}x")
        record.close()


if __name__ == "__main__":
    main()
