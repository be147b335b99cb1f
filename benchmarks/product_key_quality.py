"""Quality of product-key layers at equal active parameters and equal tokens (GPU, float32, a few minutes).

A small decoder (H 256, 4 layers) on the standard library's Python sources (byte-level BPE, the quickstart's corpus)
is trained from scratch three ways for the same steps and batches, and its held-out loss reported:

- `dense`: SwiGLU MLPs of intermediate `I + 2k/3` (the active parameters of the product-key layer);
- `product_key`: every MLP a product-key layer: a shared SwiGLU of intermediate I plus N² singleton experts, top-k;
- `peer`: the same with `heads` product-key heads of k/heads experts each (PEER's multi-head form).

`--optimizers adamw,row_sparse` trains each product-key model a second time with `hf_moe.RowSparseAdamW` on its
tables (lazy Adam: only the rows a step's batch reached move), the same batches and initialisation.

    python -m benchmarks product-key-quality --steps 600
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sysconfig
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hf_moe import HfMoeConfig, HfMoeForCausalLM, RowSparseAdamW, row_sparse_parameters

from .record import ResultFile


def corpus_blocks(vocab: int, block: int, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token blocks of the standard library's modules (every tenth file held out)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, heldout, size = [], [], 0
    for i, path in enumerate(files):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        (heldout if i % 10 == 0 else train).append(text)
        size += len(text)
        if size > max_bytes:
            break
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(train, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))

    def blocks(texts: list[str]) -> torch.Tensor:
        ids = [i for text in texts for i in tokenizer.encode(text).ids + [0]]
        n = len(ids) // block
        return torch.tensor(ids[: n * block]).view(n, block)

    return blocks(train), blocks(heldout)


def build(kind: str, args: argparse.Namespace) -> HfMoeForCausalLM:
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.hidden // 64, max_position_embeddings=args.block, router_aux_loss_coef=0.0)
    if kind == "dense":
        inter = args.shared + math.ceil(2 * args.top_k / 3)
        return HfMoeForCausalLM(HfMoeConfig(**common, intermediate_size=inter, moe_layers=[]))
    heads = args.heads if kind == "peer" else 1
    return HfMoeForCausalLM(HfMoeConfig(
        **common, intermediate_size=args.shared, router_type="product_key", num_experts=args.keys**2,
        num_experts_per_tok=args.top_k // heads, product_key_heads=heads, norm_topk_prob=kind == "peer",
        product_key_query_norm=args.query_norm,
        moe_intermediate_size=1, gated_experts=False, num_shared_experts=1, shared_expert_intermediate_size=args.shared,
    ))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shared", type=int, default=512)
    parser.add_argument("--keys", type=int, default=64, help="N: N² experts per layer")
    parser.add_argument("--top-k", type=int, default=48)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--corpus-bytes", type=int, default=6_000_000)
    parser.add_argument("--kinds", default="dense,product_key,peer")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--query-norm", default="layer_norm", help="product_key_query_norm of the product-key models")
    parser.add_argument("--optimizers", default="adamw", help="adamw and/or row_sparse (product-key models)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    train, heldout = corpus_blocks(args.vocab, args.block, args.corpus_bytes)
    heldout = heldout[:128].to(args.device)
    print(f"{train.shape[0]} train blocks, {heldout.shape[0]} held-out blocks of {args.block}", flush=True)
    with ResultFile(__name__, args.out) as out:
        runs = [(kind, name) for kind in args.kinds.split(",") for name in args.optimizers.split(",")
                if kind != "dense" or name == "adamw"]
        for kind, name in runs:
            torch.manual_seed(args.seed)
            model = build(kind, args).to(args.device).train()
            tables = row_sparse_parameters(model)  # the first layer's: how many rows a step touches
            optimizer = (RowSparseAdamW(model.parameters(), lr=args.lr, weight_decay=0.0, row_sparse=tables)
                         if name == "row_sparse" else torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0))
            touched = []
            order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(args.seed))
            started = time.perf_counter()
            for step in range(args.steps):
                rows = order[(step * args.batch + torch.arange(args.batch)) % train.shape[0]]
                batch = train[rows].to(args.device)
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                if tables:
                    touched.append(tables[0].grad.flatten(1).ne(0).any(dim=1).float().mean())  # read at the end
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            model.eval()
            with torch.no_grad():
                losses = [model(input_ids=b, labels=b).loss.item() for b in heldout.split(args.batch)]
            total = sum(p.numel() for p in model.parameters())
            row = {"model": kind, "optimizer": name, "seed": args.seed, "query_norm": args.query_norm if kind != "dense" else None,
                   "heldout_loss": round(sum(losses) / len(losses), 4),
                   "touched_rows": round(torch.stack(touched).mean().item(), 3) if touched else None,
                   "train_loss_last": round(loss.item(), 4), "params_m": round(total / 1e6, 2),
                   "tokens": args.steps * args.batch * args.block, "train_s": round(seconds, 1)}
            print(row, flush=True)
            out.write(row)
    return 0
