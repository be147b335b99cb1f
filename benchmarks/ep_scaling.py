"""Expert-parallel scaling on GPUs: tokens/s/GPU of a stack of Qwen3-30B-A3B-shaped MoE layers at P = 1, 2, 4.

Each GPU processes T tokens (default 8192) through L MoE layers (H 2048, I 768, E 128, k 8, bf16), forward and
backward. P = 1 is one GPU holding all experts; P > 1 shards experts over P GPUs (hf-moe all-to-all dispatch,
NCCL). Also times NCCL's raw `all_to_all_single` at the size of one dispatch in the same run, and the share of the
step the dispatch all-to-alls take (measured by timing the same all-to-alls alone).

    python benchmarks/ep_scaling.py                                   # P = 1
    torchrun --nproc_per_node 2 benchmarks/ep_scaling.py              # P = 2 (and 4 with 4 GPUs)
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

import hf_moe
from hf_moe.moe import dispatch
from hf_moe.parallel import expert_parallelize, init_expert_parallel


def cuda_time(fn, reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--impl", default="hf_moe_grouped")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    config = hf_moe.HfMoeConfig(hidden_size=2048, moe_intermediate_size=768, intermediate_size=768, num_experts=128,
                                num_experts_per_tok=8, num_attention_heads=16, num_hidden_layers=1, vocab_size=8)
    config._experts_implementation = args.impl
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([hf_moe.HfMoeSparseMoeBlock(config) for _ in range(args.layers)])
    for p in layers.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    layers = layers.cuda().to(torch.bfloat16)
    x = torch.randn(1, args.tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    reference = None
    if world > 1:  # every rank draws the same weights and tokens; rank 0 keeps the unsharded layers to compare
        with torch.no_grad():
            reference = layers[0](x)[0].float()
        groups = init_expert_parallel(world, config.num_experts)
        model = torch.nn.Module()
        model.layers = layers
        expert_parallelize(model, groups, global_aux_loss=False)
        with torch.no_grad():
            sharded = layers[0](x)[0].float()
        error = ((sharded - reference).norm() / reference.norm()).item()
        if rank == 0:
            print(f"P={world}: bf16 EP vs unsharded layer output, relative L2 error {error:.2e}", flush=True)

    def step():
        h = x
        for layer in layers:
            h = h + layer(h)[0]
        h.float().pow(2).mean().backward()

    seconds = cuda_time(step)
    flops = 3 * 2 * args.tokens * 8 * 3 * 2048 * 768 * args.layers
    line = (f"P={world}: fwd+bwd {seconds * 1e3:.1f} ms/step for {args.tokens} tokens/GPU x {args.layers} layers, "
            f"{args.tokens / seconds:,.0f} tokens/s/GPU, expert TFLOP/s/GPU {flops / seconds / 1e12:.0f}")
    if world > 1:
        # the dispatch moves T·k rows of H bf16 values each way, twice per layer forward and twice backward
        rows = args.tokens * 8
        send = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        raw = cuda_time(lambda: dist.all_to_all_single(recv, send))
        bytes_out = rows * 2048 * 2 * (world - 1) / world
        a2a_share = 4 * args.layers * raw / seconds
        line += (f"; raw NCCL all_to_all_single of {rows * 2048 * 2 / 2**20:.0f} MiB/rank: {raw * 1e3:.2f} ms, "
                 f"{bytes_out / raw / 1e9:.0f} GB/s per GPU; dispatch all-to-alls ~{a2a_share:.0%} of the step")
        calls = []
        original = dispatch._AllToAll.forward

        def counted(ctx, tensor, output_splits, input_splits, group):
            calls.append(sum(input_splits))
            return original(ctx, tensor, output_splits, input_splits, group)

        dispatch._AllToAll.forward = staticmethod(counted)
        step()
        dispatch._AllToAll.forward = staticmethod(original)
        line += f"; rows sent per dispatch (rank 0, first layer): {calls[0]}"
    if rank == 0:
        print(line, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
