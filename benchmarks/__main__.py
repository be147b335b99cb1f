"""`python -m benchmarks <suite> [options]`: one entry point for every benchmark suite.

`python -m benchmarks --help` lists the suites; `python -m benchmarks <suite> --help` shows a suite's options. A suite
is the module of the same name with `_` for `-` (`ep-scaling` → `benchmarks/ep_scaling.py`) and a `main()`.
Multi-process suites run under torchrun the same way: `torchrun --nproc_per_node 2 -m benchmarks ep-scaling`.
"""

from __future__ import annotations

import importlib
import sys

SUITES = {  # name: one line (the list is read without importing torch)
    "layer": "MoE block and experts vs transformers' Qwen3-MoE block (and liger_fused): training step, memory, decode",
    "grouped-gemms": "each grouped GEMM of the experts' step, hf-moe's Triton kernels vs torch's; --step / --block A/B",
    "quack-gemm": "quack-kernels' CuTe-DSL grouped GEMMs vs hf-moe's Triton and torch's, each GEMM of the step (GPU)",
    "router-fused": "the router's fused softmax -> top-k kernel vs torch's ops, interleaved A/B (GPU)",
    "router-host": "aten ops and host time of one router forward / forward+backward (CPU or GPU)",
    "sort-by-expert": "ordering the pairs by expert: torch's sort vs the one-launch and counting Triton sorts (GPU)",
    "ep-scaling": "expert-parallel tokens/s/GPU at P = 1, 2, 4, all-to-all time and bandwidth (torchrun)",
    "ep-equivalence": "expert parallel vs one process vs float64: logits, loss, gradients (torchrun, NCCL or gloo)",
    "ep-load-memory": "peak host memory of a sharded from_pretrained at P = 1, 2, 4 (CPU, launches torchrun itself)",
    "fsdp-memory": "per-rank parameter + gradient + AdamW bytes under FSDP2 + EP at W = 1, 2, 4 (CPU, launches torchrun)",
    "fsdp-gpu": "FSDP2 + EP wrapping on one GPU in bf16 (accelerate; CPU offload) vs float64 and plain bf16 (torchrun)",
    "ep-peer": "peer: transformers' native expert parallelism on ep-scaling's model (GPU, torchrun)",
    "compile": "torch.compile vs eager, hf-moe vs transformers' Qwen3-MoE / Mixtral: training, generate, DSV3 capture (GPU)",
    "product-key": "product-key layers vs FlashMoE, peer-pytorch's PEER and dense SwiGLU: fwd, fwd+bwd, memory (GPU)",
    "product-key-quality": "held-out loss of a small LM: product-key layers (and PEER heads) vs dense, equal active params",
    "upcycle-memory": "peak RSS and time of streaming upcycling vs a load-everything converter (CPU)",
    "upcycling-quality": "held-out loss at equal tokens: dense continued vs upcycled / drop / virtual-group / scratch MoE",
    "convert-memory": "peak RSS and time of streaming hf-moe convert (Qwen3-MoE -> hf_moe) vs loading everything (CPU)",
}


def usage() -> str:
    width = max(map(len, SUITES))
    lines = [f"  {name:<{width}}  {line}" for name, line in SUITES.items()]
    return ("usage: python -m benchmarks <suite> [options]     (python -m benchmarks <suite> --help for its options)\n"
            "       torchrun --nproc_per_node N -m benchmarks <suite> [options]\n\nsuites:\n" + "\n".join(lines) +
            "\n\nEach run writes its rows to benchmarks/results/<suite>-<UTC time>.jsonl (ignored by git).")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUITES:
        print(f"unknown suite {name!r}; expected one of: {', '.join(SUITES)}\n\n{usage()}", file=sys.stderr)
        return 2
    suite = importlib.import_module(f"benchmarks.{name.replace('-', '_')}")
    sys.argv = [f"python -m benchmarks {name}", *rest]  # the suite's argparse reads these (and names itself so)
    return suite.main() or 0


if __name__ == "__main__":
    sys.exit(main())
