"""Product-key layers (one H200, bf16): hf-moe against FlashMoE's Triton module, peer-pytorch's PEER and a dense
SwiGLU MLP of the same active parameters; forward, forward+backward, peak memory, outputs checked against each other.

    python -m benchmarks.product_key_peers --flash-moe-git ...     # once, with network: fills .peers/
    python -m benchmarks product-key --peers .peers                # on the GPU machine

Parts (each row printed and written to the results file):
- `flash`: FlashMoE's README example (H 1024, shared SwiGLU 4096, E 16,384, k 64, silu, no renormalisation) at each
  `--tokens`: `FlashMoE` and the hf-moe block holding its weights (`conversions.flash_moe_block_state_dict`,
  BatchNorm query as FlashMoE), forward (no grad) and forward+backward, peak memory, `rel_err` = ‖y_hf − y_flash‖ /
  ‖y_flash‖ and ‖y_hf − y_fp32‖ / ‖y_fp32‖ against the same block in float32 on torch's ops;
- `large`: hf-moe at E = 262,144 (512²), k 64, the same H and shared MLP (`--large-flash` adds FlashMoE there);
- `peer`: `PEER(dim 1024, heads 8, 16,384 experts, 8 per head, softmax scores, SiLU)` against the hf-moe block with
  `product_key_heads=8`, k 8, no query norm and no shared expert, holding PEER's weights (its query projection
  folded into the keys); with `--compile MODES` both under `torch.compile` in each mode as well (`first_call_s`:
  the first forward, compile included; `reduce-overhead` replays CUDA graphs, which a fixed-shape user can do);
  with `--graphs` both replayed from CUDA graphs as well: the training step under `torch.cuda.make_graphed_callables`
  (forward timed with gradients on, as captured), hf-moe's `capture_moe_cuda_graphs`, and the no-grad forward
  under `torch.cuda.graph` (`--graphs` in the `flash` and `large` parts: hf-moe's training step and forward the same
  way; FlashMoE's forward synchronises with the host and cannot be captured);
- `dense`: a SwiGLU MLP with the active parameters of the FlashMoE layer (intermediate 4096 + 2k/3, rounded up to
  64);
- `adamw`: one optimizer step on the two tables at E = 16,384, 262,144 and 1,048,576 after a batch of each `--tokens`
  routed uniformly (k 64): torch's fused AdamW against `hf_moe.RowSparseAdamW` (only the touched rows step);
- `selection`: the selection kernel alone (`hf_moe::product_key_pairs`) on random log-probabilities at one head,
  k 64, N = 128 and 512, and at PEER's 8 heads, k 8, N 128; its pairs checked equal to the torch path's (run on
  the CPU).

`rel_err` compares bf16 outputs whose routing may differ on near-ties, so small values (≈1e-2) are expected; the
float32 comparison is the kernel check.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
import zipfile
from pathlib import Path

import torch
from torch import nn

from conversions import flash_moe_block_state_dict, flash_moe_config_fields
from hf_moe import HfMoeConfig, HfMoeSparseMoeBlock, RowSparseAdamW, capture_moe_cuda_graphs, product_key_top_k

from .module_timing import InferenceGraph, add_gpu_work, measure
from .record import ResultFile
from .timing import median_and_min

HIDDEN, SHARED, EXPERTS, TOP_K = 1024, 4096, 16384, 64


def add_peers(peers: Path) -> None:
    """FlashMoE's folder and the unpacked wheels on `sys.path`. FlashMoE's `ops/utils.py` maps dtypes to cuTile's
    at import; where cuTile (`cuda.tile`) is not installed a stand-in with those three names lets it import (its
    Triton path never reads them)."""
    sys.path.insert(0, str(peers / "flash_moe"))
    try:
        import cuda.tile  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("cuda.tile")
        stand_in.float32, stand_in.float16, stand_in.bfloat16 = "float32", "float16", "bfloat16"
        sys.modules.setdefault("cuda", types.ModuleType("cuda"))
        sys.modules["cuda.tile"] = stand_in
    site = Path(tempfile.mkdtemp(prefix="pk-peers-"))
    for wheel in sorted((peers / "wheels").glob("*.whl")):
        zipfile.ZipFile(wheel).extractall(site)
    sys.path.insert(0, str(site))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def hf_block(fields: dict, device: str, dtype: torch.dtype) -> HfMoeSparseMoeBlock:
    config = HfMoeConfig(num_hidden_layers=1, num_attention_heads=8, vocab_size=128, intermediate_size=SHARED,
                         **fields)
    config._experts_implementation = "hf_moe_gathered"
    return HfMoeSparseMoeBlock(config).to(device=device, dtype=dtype)


def init_flash(module: nn.Module, hidden: int) -> None:
    """Tables at std H^-1/2 so that pre-activations are O(1) (FlashMoE's nn.Embedding default, N(0, 1), gives
    pre-activations of std √H); the router gate at std 1/√H; a few batches of running statistics."""
    with torch.no_grad():
        module.down_embed.weight.normal_(0, hidden**-0.5)
        module.up_embed.weight.normal_(0, hidden**-0.5)
        module.router_gate.weight.normal_(0, hidden**-0.5)
        module.router_norm.running_mean.normal_(0, 0.1)
        module.router_norm.running_var.uniform_(0.8, 1.2)


def flash_part(tokens: int, experts: int, reps: int, device: str, with_flash: bool, out: ResultFile,
               hidden: int = HIDDEN, shared: int = SHARED, top_k: int = TOP_K, graphs: bool = False) -> None:
    fields = flash_moe_config_fields(hidden, shared, "silu", experts, top_k, norm_topk_prob=False)
    block = hf_block(fields, device, torch.bfloat16).train()
    x = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16)
    rows, work = [], []
    if with_flash:
        from flash_moe.modules.flash_moe import FlashMoE, FlashMoEConfig

        flash = FlashMoE(FlashMoEConfig(hidden, shared, "silu", experts, top_k, norm_topk_prob=False))
        init_flash(flash, hidden)
        flash = flash.to(device=device, dtype=torch.bfloat16).train()
        block.load_state_dict(flash_moe_block_state_dict(flash.state_dict()))
        with torch.no_grad():
            y_flash = flash(x)[0]
        rows.append(measure("flash_moe", flash, x, reps, device, work))
    else:
        with torch.no_grad():
            block.experts.up_proj.normal_(0, hidden**-0.5)
            block.experts.down_proj.normal_(0, hidden**-0.5)
            block.router.weight.normal_(0, hidden**-0.5)
    with torch.no_grad():
        y_hf = block(x)
        reference = hf_block(fields, device, torch.float32).train()
        reference.load_state_dict(block.state_dict())
        y_ref = torch_path(reference, x.float())
    row = measure("hf_moe", block, x, reps, device, work)
    row["rel_err_vs_fp32"] = rel_err(y_hf, y_ref)
    if with_flash:
        row["rel_err_vs_flash"] = rel_err(y_hf, y_flash)
        rows[0]["rel_err_vs_fp32"] = rel_err(y_flash, y_ref)
    rows.append(row)
    if graphs:  # hf-moe only: FlashMoE's forward synchronises with the host, which a capture cannot hold
        rows += graphed_rows({"hf_moe": block}, x, reps, device, work)
    add_gpu_work(work, device)
    for r in rows:
        r.update(part="flash" if experts == EXPERTS else "large", tokens=tokens, experts=experts, top_k=top_k)
        print(r, flush=True)
        out.write(r)


def torch_path(block: HfMoeSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The block on torch's ops only (the Triton kernels switched off): the float32 reference."""
    from hf_moe.moe import kernels

    saved = kernels.HAS_TRITON
    kernels.HAS_TRITON = False
    try:
        return block(x)
    finally:
        kernels.HAS_TRITON = saved


def peer_part(tokens: int, reps: int, device: str, out: ResultFile, hidden: int = HIDDEN, experts: int = EXPERTS,
              heads: int = 8, per_head: int = 8, compile_modes: tuple[str, ...] = (), graphs: bool = False) -> None:
    from PEER_pytorch import PEER

    peer = PEER(hidden, heads=heads, num_experts=experts, num_experts_per_head=per_head, non_competing_scores=False,
                activation=nn.SiLU).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        peer.weight_down_embed.weight.normal_(0, hidden**-0.5)
        peer.weight_up_embed.weight.normal_(0, hidden**-0.5)
    fields = dict(hidden_size=hidden, hidden_act="silu", router_type="product_key", num_experts=experts,
                  num_experts_per_tok=per_head, norm_topk_prob=True, moe_intermediate_size=1, gated_experts=False,
                  product_key_heads=heads, product_key_query_norm="none")
    block = hf_block(fields, device, torch.bfloat16).train()
    num_keys, dim_key = math.isqrt(experts), peer.keys.shape[-1]
    with torch.no_grad():  # logit (h, p, key) = keys[h, key, p] · W_q[p, h] x
        w_q = peer.to_queries[0].weight.float().view(2, heads, dim_key, hidden)
        folded = torch.einsum("hkpd,phdx->hpkx", peer.keys.float(), w_q).reshape(heads * 2 * num_keys, hidden)
        block.router.weight.copy_(folded)
        block.experts.up_proj.copy_(peer.weight_down_embed.weight[:, None, :])
        block.experts.down_proj.copy_(peer.weight_up_embed.weight[:, :, None])
    x = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y_peer, y_hf = peer(x), block(x)
    work = []
    rows = [measure("peer_pytorch", peer, x, reps, device, work),
            measure("hf_moe_peer_config", block, x, reps, device, work)]
    rows[1]["rel_err_vs_peer"] = rel_err(y_hf, y_peer)
    # each under torch.compile too: a peer's best configuration counts (first call = compile time); "reduce-overhead"
    # replays CUDA graphs, so a host-bound module is timed by its GPU work
    for mode in compile_modes:
        suffix = "_compiled" if mode == "default" else f"_compiled_{mode.replace('-', '_')}"
        for name, module in (("peer_pytorch" + suffix, peer), ("hf_moe_peer_config" + suffix, block)):
            torch._dynamo.reset()
            module = torch.compile(module, mode=mode)
            started = time.perf_counter()
            with torch.no_grad():
                module(x)
            first_call_s = round(time.perf_counter() - started, 1)
            rows.append(dict(measure(name, module, x, reps, device, work, graph_steps=mode == "reduce-overhead"),
                             first_call_s=first_call_s))
    if graphs:  # the captured copies live in `work`'s calls until their profiling
        rows += graphed_rows({"peer_pytorch": peer, "hf_moe_peer_config": block}, x, reps, device, work,
                             captured="hf_moe_peer_config")
    add_gpu_work(work, device)
    for r in rows:
        r.update(part="peer", tokens=tokens, experts=experts, heads=heads, per_head=per_head)
        print(r, flush=True)
        out.write(r)


def graphed_rows(modules: dict[str, nn.Module], x: torch.Tensor, reps: int, device: str, work: list,
                 captured: str | None = None) -> list[dict]:
    """Copies of `modules` (row name prefix → module) replayed from CUDA graphs captured at this shape (what a
    fixed-shape user of either can do): the training step under `torch.cuda.make_graphed_callables`, and the no-grad
    forward under `torch.cuda.graph` (serving; not profiled: its kernels are the eager forward's, and torch.profiler
    over its replays hit an illegal memory access on an H100 once, for both modules); `captured` (an hf-moe block's
    name) also under hf-moe's own `capture_moe_cuda_graphs`, which also computes the router statistics a model
    reads."""
    sample = x.detach().clone().requires_grad_(True)
    training = lambda m: torch.cuda.make_graphed_callables(m, (sample,))  # noqa: E731
    captures = [(f"{name}_graphed", module, training, True) for name, module in modules.items()]
    if captured is not None:
        captures.append((f"{captured}_captured", modules[captured],
                         lambda m: capture_moe_cuda_graphs(m, 1, x.shape[1]), True))
    captures += [(f"{name}_inference_graph", module, lambda m: InferenceGraph(m, x), False)
                 for name, module in modules.items()]
    rows = []
    for name, module, capture, train in captures:
        try:
            module = capture(copy.deepcopy(module))
        except Exception as error:
            rows.append({"module": name, "capture_error": f"{type(error).__name__}: {str(error)[:300]}"})
            traceback.print_exc(limit=2)
            continue
        rows.append(measure(name, module, sample if train else x, reps, device, work if train else None,
                            backward=train, forward_grad=train))
    return rows


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


def dense_part(tokens: int, reps: int, device: str, out: ResultFile, hidden: int = HIDDEN, shared: int = SHARED,
               top_k: int = TOP_K) -> None:
    inter = shared + 64 * math.ceil(2 * top_k / 3 / 64)
    mlp = SwiGLU(hidden, inter).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16)
    work = []
    row = measure("dense_swiglu", mlp, x, reps, device, work)
    add_gpu_work(work, device)
    row.update(part="dense", tokens=tokens, intermediate=inter)
    print(row, flush=True)
    out.write(row)


def adamw_part(experts: int, tokens: int, reps: int, device: str, out: ResultFile, hidden: int = HIDDEN,
               top_k: int = TOP_K) -> None:
    """One optimizer step on the two `[E, H]` tables after a batch of `tokens` routed uniformly to k experts each:
    torch's AdamW (fused on CUDA, its fastest) against `RowSparseAdamW`, which steps only the touched rows."""
    gen = torch.Generator(device=device).manual_seed(0)
    touched = torch.zeros(experts, dtype=torch.bool, device=device)
    touched[torch.randint(0, experts, (tokens * top_k,), device=device, generator=gen)] = True
    optimizers = {}
    for name in ("adamw", "row_sparse"):
        tables = [nn.Parameter(torch.randn(experts, hidden, device=device, dtype=torch.bfloat16)) for _ in range(2)]
        for t in tables:
            t.grad = torch.randn_like(t) * touched[:, None]
        optimizers[name] = (torch.optim.AdamW(tables, lr=1e-4, fused=device == "cuda") if name == "adamw" else
                            RowSparseAdamW(tables, lr=1e-4, row_sparse=tables))
        optimizers[name].step()
    ms = {name: median_and_min(opt.step, device, reps)[0] * 1e3 for name, opt in optimizers.items()}
    state = optimizers["adamw"].state.values()
    row = {"part": "adamw", "experts": experts, "tokens": tokens, "touched": round(touched.float().mean().item(), 3),
           "adamw_ms": round(ms["adamw"], 3), "row_sparse_ms": round(ms["row_sparse"], 3),
           "speedup": round(ms["adamw"] / ms["row_sparse"], 2),
           "state_mib": round(sum(s.numel() * s.element_size() for st in state for s in st.values()
                                  if torch.is_tensor(s)) / 2**20, 1)}
    print(row, flush=True)
    out.write(row)


def selection_part(tokens: int, reps: int, device: str, out: ResultFile, top_k: int = TOP_K) -> None:
    from hf_moe.moe.kernels.product_key_top_k import product_key_pairs  # needs Triton

    n = int(math.isqrt(EXPERTS))
    for heads, keys, k in ((1, n, top_k), (1, 512, top_k), (8, n, 8)):  # FlashMoE's, the large, PEER's selections
        log_probs = torch.randn(tokens, heads, 2, keys, device=device).log_softmax(-1)
        experts, _, _ = product_key_pairs(log_probs, k)
        want, _ = product_key_top_k(log_probs.cpu(), k)
        row = {"part": "selection", "tokens": tokens, "heads": heads, "keys": keys, "top_k": k,
               "kernel_ms": round(median_and_min(lambda lp=log_probs, k=k: product_key_pairs(lp, k), device, reps)[0]
                                  * 1e3, 4),
               "equals_torch_path": torch.equal(experts.cpu(), want)}
        print(row, flush=True)
        out.write(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=os.environ.get("HF_MOE_PEERS", ".peers"))
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--parts", default="flash,dense,large,adamw,peer", help="run in this order")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--large-flash", action="store_true", help="run FlashMoE at E = 262,144 too (very slow)")
    parser.add_argument("--budget-s", type=float, default=420, help="start no part after this many seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", nargs="?", const="default", default="",
                        help="peer part: also both modules under torch.compile, in these modes (comma-separated; "
                             "no value: the default mode), e.g. default,reduce-overhead")
    parser.add_argument("--graphs", action="store_true",
                        help="peer, flash and large parts: also replayed from CUDA graphs (GPU): both modules of "
                             "the peer part, hf-moe in the others")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (checks the suite itself, e.g. on CPU)")
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/...)")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # run this one step (a child process)
    args = parser.parse_args()
    add_peers(Path(args.peers))
    tokens = [int(t) for t in args.tokens.split(",")]
    compile_modes = tuple(filter(None, args.compile.split(",")))
    parts = args.parts.split(",")
    shape = dict(hidden=64, shared=128, top_k=4) if args.smoke else {}
    experts, large, huge = (64, 256, 1024) if args.smoke else (EXPERTS, 512 * 512, 1024 * 1024)
    if args.smoke:
        tokens = [8]
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}",
          flush=True)
    started = time.monotonic()
    plan = {}  # in --parts order, each part at every --tokens before the next part
    for part in parts:
        for t in tokens:
            if part == "flash":
                plan[f"flash:{t}"] = lambda t=t: flash_part(t, experts, args.reps, args.device, True, out,
                                                            graphs=args.graphs, **shape)
            elif part == "large":
                plan[f"large:{t}"] = lambda t=t: flash_part(t, large, args.reps, args.device, args.large_flash, out,
                                                            graphs=args.graphs, **shape)
            elif part == "peer":
                small = {"hidden": 64, "heads": 2, "per_head": 2} if args.smoke else {}
                plan[f"peer:{t}"] = lambda t=t: peer_part(t, args.reps, args.device, out, experts=experts,
                                                          compile_modes=compile_modes, graphs=args.graphs, **small)
            elif part == "dense":
                plan[f"dense:{t}"] = lambda t=t: dense_part(t, args.reps, args.device, out, **shape)
            elif part == "adamw":
                for e in (experts, large, huge):
                    plan[f"adamw:{e}:{t}"] = lambda e=e, t=t: adamw_part(e, t, args.reps, args.device, out,
                                                                         hidden=shape.get("hidden", HIDDEN),
                                                                         top_k=shape.get("top_k", TOP_K))
            elif part == "selection":
                plan[f"selection:{t}"] = lambda t=t: selection_part(t, args.reps, args.device, out,
                                                                    top_k=shape.get("top_k", TOP_K))
    with ResultFile(__name__, args.out) as out:
        if args.step is not None:  # a child: one step
            plan[args.step]()
            return 0
        for label, step in plan.items():
            if time.monotonic() - started > args.budget_s:
                print(f"budget of {args.budget_s} s spent: skipping the remaining parts", flush=True)
                break
            # On a GPU each step runs in a process of its own: a step's profiling (torch.profiler) would make every
            # later launch of the process slower, and a peer's failure cannot leave the CUDA context broken.
            if args.device == "cuda":
                done = subprocess.run([sys.executable, "-m", "benchmarks", "product-key", *sys.argv[1:], "--step",
                                       label, "--out", str(out.path)], check=False)
                if done.returncode:
                    print(f"step {label} failed (exit status {done.returncode})", flush=True)
                continue
            try:
                step()
            except Exception:
                traceback.print_exc()
        if args.device == "cuda":
            print(f"results: {out.path}", flush=True)
    return 0
