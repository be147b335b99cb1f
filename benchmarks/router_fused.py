"""The router's fused softmax → top-k kernel against the same router on torch's ops, in one run (GPU).

For each shape it times, interleaved round by round, the router alone (forward+backward through the weights and
the aux loss) and the whole MoE block's training step (forward+backward from an output gradient), with the fused
kernel on and off (`HfMoeRouter.fuses_softmax_top_k`), and prints the ratios. bf16, training mode.

    python -m benchmarks router-fused                          # Qwen3-30B-A3B and Mixtral shapes, T = 8192
    python -m benchmarks router-fused --shapes qwen3 --tokens 2048,8192
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers

from hf_moe import HfMoeRouter

from .layer import build_blocks
from .record import ResultFile
from .timing import interleaved_ms, ratio

SHAPES = {"qwen3": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2)}  # hidden, moe_intermediate, experts, k
FUSES = HfMoeRouter.fuses_softmax_top_k


@contextmanager
def fused(enabled: bool) -> Iterator[None]:
    """The router's choice as it is, or torch's ops everywhere."""
    HfMoeRouter.fuses_softmax_top_k = FUSES if enabled else (lambda self, logits: False)
    try:
        yield
    finally:
        HfMoeRouter.fuses_softmax_top_k = FUSES


def run(name: str, tokens: int, rounds: int) -> list[dict]:
    hidden, inter, experts, top_k = SHAPES[name]
    block = build_blocks((hidden, inter, experts, top_k), "cuda", torch.bfloat16)[0].train()  # hf_moe_grouped
    x = torch.randn(1, tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x2d = x.detach().view(-1, hidden).requires_grad_(True)
    grad_weights = torch.randn(tokens, top_k, device="cuda")
    grad_out = torch.randn_like(x)

    def router_step():
        out = block.router(x2d)
        ((out.top_k_weights.float() * grad_weights).sum() + out.aux_loss).backward()

    def block_step():
        block(x).backward(grad_out)

    rows = []
    for what, fn in (("router fwd+bwd", router_step), ("block fwd+bwd", block_step)):
        fused_ms, torch_ms = interleaved_ms(fn, fused, rounds)
        row = {"shape": name, "tokens": tokens, "what": what, "fused_ms": fused_ms, "torch_ops_ms": torch_ms}
        row["torch_ops_over_fused"] = row["torch_ops_ms"] / row["fused_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3,mixtral", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--tokens", default="8192", help="comma list of token counts")
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(env))
    rows = []
    with ResultFile(__name__) as out:
        out.write({"what": "env", **env})
        for name in a.shapes.split(","):
            for tokens in (int(t) for t in a.tokens.split(",")):
                for row in run(name, tokens, a.rounds):
                    out.write(row)
                    rows.append(row)
                torch.cuda.empty_cache()
    print("\n| shape | T | step | fused ms | torch ops ms | torch ops / fused |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {r['tokens']} | {r['what']} | {r['fused_ms']:.3f} | {r['torch_ops_ms']:.3f} | "
              f"{ratio(r['torch_ops_ms'], r['fused_ms'], 3)} |")


if __name__ == "__main__":
    main()
