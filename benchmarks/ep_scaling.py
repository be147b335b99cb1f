"""Expert-parallel scaling on GPUs: tokens/s/GPU of Qwen3-30B-A3B-shaped MoE layers at P = 1, 2, 4.

Each GPU processes T tokens (default 8192) forward and backward, bf16, through either a stack of MoE blocks
(`--mode layers`: H 2048, I 768, E 128, k 8) or the whole hf-moe causal LM at the shape of transformers' peer script
(`--mode model`: 2 decoder layers with attention, vocabulary 2048, sequences of 2048), so its numbers sit next to
the `ep-peer` suite (transformers' native EP). P = 1 is one GPU with all experts; P > 1 shards experts over P GPUs with the
hf-moe all-to-all dispatcher (NCCL). In the same run it measures:

* the time the dispatcher's own all-to-alls take inside one training step (CUDA events around every
  `all_to_all_single` it issues, forward and backward, counts and routing exchanges included) and their share of
  the step, and the rows each token all-to-all moves per token (1 would mean every token to one other rank);
* the bandwidth those token all-to-alls reach (bytes that leave the GPU / time), next to NCCL's raw
  `all_to_all_single` with equal splits at their mean per-rank size;
* for P > 1, the relative L2 error of the sharded first layer's bf16 output against the unsharded layer.

For P > 1 every rank also keeps an unsharded copy of the model and times it on its own tokens, interleaved step by
step with the expert-parallel model in three variants (the default dispatcher, with the backward overlap of weight
gradients and all-to-alls, and padded mode without host sync): the efficiency against one GPU then compares steps
taken under the same conditions (launches of the same script vary by up to 20% between them on the host-bound
steps). Each variant is then also timed alone, with the memory its step adds. The all-to-alls are timed in a separate step with the
overlap off, so their times are theirs alone.

    python -m benchmarks ep-scaling                                   # P = 1
    torchrun --nproc_per_node 2 -m benchmarks ep-scaling              # P = 2 (4 with 4 GPUs)
    torchrun --nproc_per_node 2 -m benchmarks ep-scaling --hidden 64 --expert-size 32 --experts 8 --top-k 2 \
        --tokens 256 --seq 64 --vocab 128                             # CPU smoke run (gloo; times meaningless)

Prints one `RESULT {json}` line per run (rank 0) and a readable summary line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

import torch
import torch.distributed as dist

import hf_moe
from hf_moe.moe import dispatch
from hf_moe.moe.overlap import WEIGHT_GRADS
from hf_moe.parallel import expert_parallelize, init_expert_parallel

from . import timing
from .record import ResultFile

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ARGS: argparse.Namespace  # set by main()


def event():
    return timing.event(DEVICE)


def synchronize() -> None:
    timing.synchronize(DEVICE)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device_times(fns: dict, reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median device and host seconds of each of `fns` over rounds that run them in turn, ranks aligned by a barrier
    before each call (`timing.device_times`)."""
    return timing.device_times(fns, DEVICE, reps, before_each=barrier)


def device_time(fn, reps: int) -> float:
    return device_times({"": fn}, reps)[0][""]


class AllToAllTimer:
    """Wraps `all_to_all_single` as the dispatcher sees it and records CUDA events and bytes of every call. Token
    all-to-alls are the calls whose rows are hidden-size wide; the others carry counts and routing."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.original = dispatch.dist.all_to_all_single

    def __enter__(self) -> AllToAllTimer:
        def timed(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            start, end = event(), event()
            start.record()
            work = self.original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
            end.record()
            row_bytes = input[0].numel() * input.element_size() if input.dim() > 1 and len(input) else 0
            me = dist.get_rank(group)
            off_rank = sum(s for i, s in enumerate(input_split_sizes or []) if i != me) * row_bytes
            is_token = input.dim() > 1 and input.shape[-1] == ARGS.hidden
            self.calls.append((start, end, off_rank, is_token, input.shape[0]))
            return work

        dispatch.dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc) -> None:
        dispatch.dist.all_to_all_single = self.original

    def summary(self) -> tuple[float, float, float, int, int]:
        """(seconds in all all-to-alls, seconds in token all-to-alls, bytes of tokens sent off-rank, number of token
        all-to-alls, their mean rows per rank)."""
        synchronize()
        every = sum(s.elapsed_time(e) for s, e, *_ in self.calls) / 1e3
        token_calls = [c for c in self.calls if c[3]]
        tokens = sum(s.elapsed_time(e) for s, e, *_ in token_calls) / 1e3
        mean_rows = round(statistics.mean(c[4] for c in token_calls)) if token_calls else 0
        return every, tokens, sum(c[2] for c in token_calls), len(token_calls), mean_rows


def build(mode: str, layers: int, impl: str) -> torch.nn.Module:
    """The model, built on the GPU with the same weights on every rank (seed 0)."""
    torch.manual_seed(0)
    if mode == "layers":
        config = hf_moe.HfMoeConfig(hidden_size=ARGS.hidden, moe_intermediate_size=ARGS.expert_size,
                                    intermediate_size=ARGS.expert_size, num_experts=ARGS.experts,
                                    num_experts_per_tok=ARGS.top_k, num_attention_heads=16, num_hidden_layers=1,
                                    vocab_size=8)
        config._experts_implementation = impl
        model = torch.nn.Module()
        with torch.device(DEVICE):
            model.layers = torch.nn.ModuleList([hf_moe.HfMoeSparseMoeBlock(config) for _ in range(layers)])
        for p in model.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        return model.to(torch.bfloat16)
    config = hf_moe.HfMoeConfig(hidden_size=ARGS.hidden, moe_intermediate_size=ARGS.expert_size,
                                intermediate_size=3 * ARGS.hidden, num_experts=ARGS.experts,
                                num_experts_per_tok=ARGS.top_k, num_hidden_layers=layers, num_attention_heads=32,
                                num_key_value_heads=4, head_dim=128, vocab_size=ARGS.vocab, qk_norm=True)
    config._attn_implementation = "sdpa"
    config._experts_implementation = impl
    with torch.device(DEVICE):
        model = hf_moe.HfMoeForCausalLM(config)
    return model.to(torch.bfloat16).train()


def with_dispatchers(dispatchers: list, step, **settings):
    """`step` with the dispatchers' attributes set to `settings` (`weight_grads=WEIGHT_GRADS`: the weight gradients
    computed while the backward all-to-alls travel)."""

    def run():
        saved = [{name: getattr(d, name) for name in settings} for d in dispatchers]
        for d in dispatchers:
            d.__dict__.update(settings)
        try:
            step()
        finally:
            for d, old in zip(dispatchers, saved):
                d.__dict__.update(old)

    return run


def capture_aside(model: torch.nn.Module) -> list:
    """Capture the model's MoE blocks in CUDA graphs (`hf_moe.capture_moe_cuda_graphs`) for this run's step shape,
    before any DDP wrapping, and set the graphs aside so that the other variants run eagerly; `with_graphs` puts
    them back for one step."""
    blocks = [m for m in model.modules() if isinstance(m, hf_moe.HfMoeSparseMoeBlock)]
    batch, seq = (1, ARGS.tokens) if ARGS.mode == "layers" else (ARGS.tokens // ARGS.seq, ARGS.seq)
    hf_moe.capture_moe_cuda_graphs(model, batch, seq)
    graphs = [(b, b._cuda_graph) for b in blocks]
    for b in blocks:
        b._cuda_graph = None
    return graphs


def with_graphs(graphs: list, step):
    def run():
        for b, g in graphs:
            b._cuda_graph = g
        try:
            step()
        finally:
            for b, _ in graphs:
                b._cuda_graph = None

    return run


def training_step(model: torch.nn.Module, rank: int):
    """fwd+bwd on this rank's own tokens (different on every rank, so routing differs as in training)."""
    g = torch.Generator(DEVICE).manual_seed(1000 + rank)
    if ARGS.mode == "layers":
        x = torch.randn(1, ARGS.tokens, ARGS.hidden, device=DEVICE, dtype=torch.bfloat16, generator=g,
                        requires_grad=True)

        def step():
            h = x
            for layer in model.layers:
                h = h + layer(h)[0]
            h.float().pow(2).mean().backward()

        return step
    ids = torch.randint(0, ARGS.vocab, (ARGS.tokens // ARGS.seq, ARGS.seq), device=DEVICE, generator=g)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def main() -> None:
    global ARGS
    ARGS = parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    model = build(ARGS.mode, ARGS.layers, ARGS.impl)
    result = {"mode": ARGS.mode, "P": world, "tokens_per_gpu": ARGS.tokens, "layers": ARGS.layers,
              "shape": [ARGS.hidden, ARGS.expert_size, ARGS.experts, ARGS.top_k], "impl": ARGS.impl,
              "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}
    fns = {}
    graphs = ARGS.graphs and DEVICE == "cuda"
    if world > 1:
        one_gpu = copy.deepcopy(model)
        fns["one GPU"] = training_step(one_gpu, rank)
        first = model.layers[0] if ARGS.mode == "layers" else model.model.layers[0].mlp
        probe = torch.randn(1, ARGS.tokens, ARGS.hidden, device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():
            reference = first(probe)[0].float()
        groups = init_expert_parallel(world, ARGS.experts)
        expert_parallelize(model, groups, global_aux_loss=ARGS.mode == "model")
        with torch.no_grad():
            sharded = first(probe)[0].float()
        result["bf16_rel_l2_vs_unsharded"] = ((sharded - reference).norm() / reference.norm()).item()
        if graphs:  # captured before DDP wraps the model (DDP keeps autograd nodes that capture must not meet)
            dispatchers = [m.expert_parallel for m in model.modules() if getattr(m, "expert_parallel", None) is not None]
            try:
                one_gpu_graphs = capture_aside(one_gpu)
                for d in dispatchers:  # the graphs keep the padded dispatch they capture; the eager variants go on
                    d.padded = True
                ep_graphs = capture_aside(model)
            except Exception as e:  # report and go on with the eager variants
                result["graphs_error"] = f"{type(e).__name__}: {e}"[:500]
                print(f"rank {rank}: CUDA graphs failed: {result['graphs_error']}", flush=True)
                graphs = False
            finally:
                for d in dispatchers:
                    d.padded = False
        if ARGS.mode == "model":  # as in training: DDP averages the replicated weights' gradients
            model = torch.nn.parallel.DistributedDataParallel(model)
    step = fns["EP"] = training_step(model, rank)
    dispatchers = [m.expert_parallel for m in model.modules() if getattr(m, "expert_parallel", None) is not None]
    if dispatchers:
        fns["EP overlap"] = with_dispatchers(dispatchers, step, weight_grads=WEIGHT_GRADS)
        fns["EP padded"] = with_dispatchers(dispatchers, step, padded=True)
    if graphs and world > 1:
        fns["one GPU graphed"] = with_graphs(one_gpu_graphs, fns["one GPU"])
        fns["EP padded graphed"] = with_graphs(ep_graphs, step)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = device_time(step, ARGS.reps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    if world > 1:
        same_run = device_times(fns, ARGS.reps)[0]
        alone, host, activations = {}, {}, {}
        for name, fn in fns.items():  # each variant on its own, with its host time and the memory its step adds
            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
            seconds_alone, seconds_host = device_times({name: fn}, ARGS.reps)
            alone[name], host[name] = seconds_alone[name] * 1e3, seconds_host[name] * 1e3
            activations[name] = (torch.cuda.max_memory_allocated() - before) / 2**30 if DEVICE == "cuda" else 0.0
        result.update(same_run_ms={name: t * 1e3 for name, t in same_run.items()},
                      same_run_efficiency={name: same_run["one GPU"] / t for name, t in same_run.items()},
                      alone_ms=alone, alone_efficiency={name: alone["one GPU"] / t for name, t in alone.items()},
                      alone_host_ms=host, step_gib=activations)
    # fwd + 2x bwd, gate/up/down of the k active experts of every token
    expert_flops = 3 * 2 * ARGS.tokens * ARGS.top_k * 3 * ARGS.hidden * ARGS.expert_size * ARGS.layers
    result.update(step_ms=seconds * 1e3, tokens_per_s_per_gpu=ARGS.tokens / seconds,
                  expert_tflops_per_gpu=expert_flops / seconds / 1e12,
                  peak_gib=peak)
    if world > 1:
        with AllToAllTimer() as timer:
            step()  # without the overlap: no GEMMs inside the backward all-to-alls' timing
        a2a_all, a2a_tokens, off_rank, token_calls, rows = timer.summary()
        # raw NCCL with equal splits at the mean size of one token all-to-all of this step (H bf16 values per row)
        agreed = torch.tensor([rows], device=DEVICE)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)  # every rank must send the same size
        rows = max(world, int(agreed) // world * world)
        send = torch.randn(rows, ARGS.hidden, device=DEVICE, dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        raw = device_time(lambda: dist.all_to_all_single(recv, send), ARGS.reps)
        result.update(
            a2a_ms=a2a_all * 1e3, a2a_share=a2a_all / seconds, token_a2a_ms=a2a_tokens * 1e3,
            token_a2a_calls=token_calls, token_rows_per_call=rows, token_rows_per_token=rows / ARGS.tokens,
            dispatch_a2a_gbps=off_rank / a2a_tokens / 1e9,
            raw_nccl_mib_per_rank=rows * ARGS.hidden * 2 / 2**20, raw_nccl_ms=raw * 1e3,
            raw_nccl_gbps=rows * ARGS.hidden * 2 * (world - 1) / world / raw / 1e9,
            raw_equivalent_ms=raw * token_calls * 1e3,
        )
    if ARGS.trace:  # one step of each variant under torch.profiler, a Chrome trace per rank (open in Perfetto)
        os.makedirs(ARGS.trace, exist_ok=True)
        for name, fn in fns.items():
            if ARGS.trace_variants and name not in ARGS.trace_variants.split(","):
                continue
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn()
                synchronize()
            label = name.replace(" ", "_")
            prof.export_chrome_trace(os.path.join(ARGS.trace, f"{ARGS.mode}_P{world}_{label}_rank{rank}.json.gz"))
    if rank == 0:
        with ResultFile(__name__) as out:
            out.write(result)
        print("RESULT " + json.dumps(result), flush=True)
        line = (f"{ARGS.mode} P={world}: {result['step_ms']:.1f} ms/step, {result['tokens_per_s_per_gpu']:,.0f} "
                f"tokens/s/GPU, expert TFLOP/s/GPU {result['expert_tflops_per_gpu']:.0f}, "
                f"peak {result['peak_gib']:.1f} GiB")
        if world > 1:
            line += (f"; dispatcher all-to-alls {result['a2a_ms']:.1f} ms = {result['a2a_share']:.0%} of the step, "
                     f"{result['token_rows_per_token']:.2f} rows/token, "
                     f"{result['dispatch_a2a_gbps']:.0f} GB/s per GPU vs raw NCCL {result['raw_nccl_gbps']:.0f} GB/s "
                     f"at {result['raw_nccl_mib_per_rank']:.0f} MiB/rank; bf16 vs unsharded "
                     f"{result['bf16_rel_l2_vs_unsharded']:.1e}")
            for kind in ("same_run", "alone"):
                ms, eff = result[f"{kind}_ms"], result[f"{kind}_efficiency"]
                line += f"\n{ARGS.mode} P={world} {'interleaved' if kind == 'same_run' else 'each alone '}: " + ", ".join(
                    f"{name} {ms[name]:.1f} ms = {eff[name]:.0%}" for name in ms)
            line += "\nhost time to issue a step (ms): " + ", ".join(
                f"{name} {ms:.1f}" for name, ms in result["alone_host_ms"].items())
            line += "\nmemory a step adds (GiB): " + ", ".join(
                f"{name} {gib:.2f}" for name, gib in result["step_gib"].items())
        print(line, flush=True)
    if dist.is_initialized() and not any(name.endswith("graphed") for name in fns):
        dist.destroy_process_group()  # (with NCCL captured in CUDA graphs it can hang: the process exit cleans up)
    elif dist.is_initialized():
        os._exit(0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["layers", "model"], default="layers")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GPU")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--impl", default="hf_moe_grouped", help="experts implementation")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048, help="Qwen3-30B-A3B: 2048")
    parser.add_argument("--expert-size", type=int, default=768, help="Qwen3-30B-A3B: 768")
    parser.add_argument("--experts", type=int, default=128, help="Qwen3-30B-A3B: 128")
    parser.add_argument("--top-k", type=int, default=8, help="Qwen3-30B-A3B: 8")
    parser.add_argument("--trace", help="folder: also write a Chrome trace of one step per variant and rank")
    parser.add_argument("--trace-variants", default="", help="comma list of the variants to trace (default: all)")
    parser.add_argument("--graphs", action="store_true",
                        help="on GPUs: also time one GPU and padded EP with the MoE blocks in CUDA graphs "
                             "(hf_moe.capture_moe_cuda_graphs)")
    parser.add_argument("--vocab", type=int, default=2048, help="--mode model (as transformers' peer script)")
    parser.add_argument("--seq", type=int, default=2048, help="--mode model: sequence length")
    return parser.parse_args()


if __name__ == "__main__":
    main()
