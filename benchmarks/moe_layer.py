"""MoE layer benchmark: hf-moe's experts and block next to transformers' Qwen3-MoE block and a dense GEMM, in one run.

Reports TFLOP/s of active expert FLOPs (2·T·k·3·H·I forward, ×3 forward+backward), peak memory per token, and
hf-moe / peer ratios. Routing is controlled (the same top-k indices and weights go to every implementation):
`uniform` (random logits), `balanced` (every expert gets exactly T·k/E slots), `skewed` (Zipf-like, s = 1.2).

    python benchmarks/moe_layer.py                                    # GPU: Mixtral, Qwen3-30B-A3B, DeepSeek-V3-like
    python benchmarks/moe_layer.py --device cpu                       # CPU: small shape, fp32
    python benchmarks/moe_layer.py --shapes qwen3 --tokens 8192,32768 --routing uniform
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {  # name: (hidden, moe_intermediate, experts, top_k)
    "mixtral": (4096, 14336, 8, 2),
    "qwen3": (2048, 768, 128, 8),
    "dsv3": (7168, 2048, 256, 8),
    "small": (512, 1024, 16, 2),
}


def timeit(fn, device: str, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def routing(kind: str, tokens: int, experts: int, top_k: int, device: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "uniform":
        index = torch.rand(tokens, experts, device=device).topk(top_k, dim=-1).indices
    elif kind == "balanced":
        slots = torch.arange(tokens * top_k, device=device)
        index = (slots % experts).view(tokens, top_k)
    else:
        probs = 1.0 / torch.arange(1, experts + 1, device=device, dtype=torch.float32) ** 1.2
        index = torch.multinomial(probs.expand(tokens, -1), top_k)
    weights = torch.rand(tokens, top_k, device=device).softmax(dim=-1).to(dtype)
    return index, weights


def build(name: str, device: str, dtype, impl: str):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    import hf_moe

    hidden, inter, experts, top_k = SHAPES[name]
    peer_cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                              num_experts_per_tok=top_k, norm_topk_prob=True, num_hidden_layers=1)
    peer = Qwen3MoeSparseMoeBlock(peer_cfg).to(device=device, dtype=dtype)
    ours_cfg = hf_moe.HfMoeConfig(hidden_size=hidden, moe_intermediate_size=inter, intermediate_size=inter,
                                  num_experts=experts, num_experts_per_tok=top_k, num_attention_heads=8,
                                  num_hidden_layers=1, vocab_size=8)
    ours = hf_moe.HfMoeSparseMoeBlock(ours_cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0, 0.02)
        ours.experts.gate_up_proj.copy_(peer.experts.gate_up_proj)
        ours.experts.down_proj.copy_(peer.experts.down_proj)
        ours.router.weight.copy_(peer.gate.weight)
    ours_cfg._experts_implementation = impl
    return peer, peer_cfg, ours, ours_cfg


def measure(fn_fwd, fn_bwd, device, reps, tokens) -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fwd = timeit(fn_fwd, device, reps)
    out = {"fwd_s": fwd}
    if fn_bwd is not None:
        out["fwdbwd_s"] = timeit(fn_bwd, device, reps)
        if device == "cuda":
            out["act_bytes_per_token"] = (torch.cuda.max_memory_allocated() - base) / tokens
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    parser.add_argument("--tokens", default=None, help="comma list of token counts")
    parser.add_argument("--routing", default="uniform,balanced,skewed")
    parser.add_argument("--impl", default="hf_moe_grouped", help="hf-moe experts implementation to measure")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--decode", action="store_true", help="also time T=64 forward against the HBM floor")
    parser.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    args = parser.parse_args()
    import transformers

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = (args.shapes or ("mixtral,qwen3,dsv3" if device == "cuda" else "small")).split(",")
    token_counts = [int(t) for t in (args.tokens or ("4096,8192,16384" if device == "cuda" else "1024")).split(",")]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, dtype {dtype}")
    if device == "cuda":
        n = 8192
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        print(f"dense GEMM {n}^3: {2 * n**3 / timeit(lambda: a @ b, device, 10) / 1e12:.0f} TFLOP/s")
        src = torch.randn(2**28, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        bandwidth = 2 * src.numel() * 2 / timeit(lambda: dst.copy_(src), device, 10)
        print(f"device copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)")
        del a, b, src, dst
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    for name in shapes:
        hidden, inter, experts, top_k = SHAPES[name]
        peer, peer_cfg, ours, ours_cfg = build(name, device, dtype, args.impl)
        for tokens in token_counts:
            flops = 2 * tokens * top_k * 3 * hidden * inter
            if device == "cuda":
                x_dense = torch.randn(tokens * top_k, hidden, device=device, dtype=dtype)
                w_dense = torch.randn(hidden, 3 * inter, device=device, dtype=dtype)
                dense = timeit(lambda: x_dense @ w_dense, device, args.reps)
                del x_dense, w_dense
                print(f"\n{name} T={tokens}: dense-equivalent GEMM {flops / dense / 1e12:.0f} TFLOP/s")
            else:
                print(f"\n{name} T={tokens}")
            for kind in args.routing.split(","):
                index, weights = routing(kind, tokens, experts, top_k, device, dtype)
                x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
                results = {}
                candidates = [("hf-moe " + args.impl, ours.experts, ours_cfg, args.impl),
                              ("transformers grouped_mm", peer.experts, peer_cfg, "grouped_mm")]
                if device == "cpu" or name == "mixtral":
                    candidates.append(("transformers eager", peer.experts, peer_cfg, "eager"))
                if device == "cpu":  # (transformers' batched_mm gathers one weight matrix per slot: ~30 s here)
                    candidates.append(("hf-moe eager", ours.experts, ours_cfg, "eager"))
                for label, experts_module, cfg, impl in candidates:
                    cfg._experts_implementation = impl
                    w = weights.detach().requires_grad_(True)

                    def fwd(experts_module=experts_module, w=w):
                        return experts_module(x, index, w)

                    def fwd_bwd(experts_module=experts_module, w=w):
                        experts_module(x, index, w).float().pow(2).mean().backward()
                        x.grad = None
                        experts_module.zero_grad(set_to_none=True)

                    try:
                        r = measure(fwd, fwd_bwd, device, args.reps, tokens)
                    except Exception as e:  # a peer implementation that cannot run this case
                        print(f"  {kind:<9} {label:<28} failed: {repr(e)[:120]}")
                        continue
                    r.update(fwd_tflops=flops / r["fwd_s"] / 1e12, fwdbwd_tflops=3 * flops / r["fwdbwd_s"] / 1e12)
                    results[label] = r
                    emit({"shape": name, "tokens": tokens, "routing": kind, "impl": label, **r})
                    mem = f"  {r['act_bytes_per_token'] / 1024:.1f} KiB/token" if "act_bytes_per_token" in r else ""
                    print(f"  {kind:<9} {label:<28} fwd {r['fwd_s'] * 1e3:8.2f} ms {r['fwd_tflops']:7.1f} TFLOP/s   "
                          f"fwd+bwd {r['fwdbwd_s'] * 1e3:8.2f} ms {r['fwdbwd_tflops']:7.1f} TFLOP/s{mem}")
                ours_label = "hf-moe " + args.impl
                peers = [k for k in results if k.startswith("transformers")]
                if ours_label in results and peers:
                    best = min(peers, key=lambda k: results[k]["fwdbwd_s"])
                    print(f"  {kind:<9} ratio hf-moe / best peer ({best}): fwd "
                          f"{results[best]['fwd_s'] / results[ours_label]['fwd_s']:.2f}x faster, fwd+bwd "
                          f"{results[best]['fwdbwd_s'] / results[ours_label]['fwdbwd_s']:.2f}x faster")
            if device == "cuda" and args.decode and tokens == token_counts[0]:
                decode_tokens = 64
                index, weights = routing("uniform", decode_tokens, experts, top_k, device, dtype)
                x = torch.randn(decode_tokens, hidden, device=device, dtype=dtype)
                touched = index.unique().numel() * 3 * hidden * inter * 2
                floor = touched / (bandwidth / 2)
                for label, experts_module, cfg, impl in [("hf-moe " + args.impl, ours.experts, ours_cfg, args.impl),
                                                         ("transformers grouped_mm", peer.experts, peer_cfg,
                                                          "grouped_mm")]:
                    cfg._experts_implementation = impl
                    with torch.no_grad():
                        t = timeit(lambda experts_module=experts_module: experts_module(x, index, weights), device,
                                   args.reps * 3)
                    emit({"shape": name, "tokens": decode_tokens, "routing": "decode", "impl": label, "fwd_s": t,
                          "hbm_floor_s": floor})
                    print(f"  decode T=64 {label:<28} {t * 1e3:.3f} ms = {t / floor:.2f}x the HBM floor "
                          f"({floor * 1e3:.3f} ms for {touched / 1e9:.2f} GB of experts)")
        del peer, ours
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
