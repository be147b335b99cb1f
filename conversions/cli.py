"""`hf-moe` command line: `hf-moe upcycle SRC OUT [...]` (also `python -m conversions upcycle ...`)."""

from __future__ import annotations

import argparse
import sys

from .source import SourceError
from .upcycle import UpcycleConfig, upcycle


def _moe_layers(text: str) -> str | list[int]:
    if text in ("all", "every-other"):
        return text
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'all', 'every-other' or indices like 0,2,5") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe", description="hf-moe converters")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("upcycle", help="turn a dense Llama/Mistral/Qwen2/Qwen3 checkpoint into an MoE",
                             description="Upcycle a dense checkpoint (safetensors) into an hf-moe MoE checkpoint.")
    up.add_argument("source", help="dense model folder (config.json + *.safetensors)")
    up.add_argument("output", help="output folder (must be empty or absent unless --overwrite)")
    up.add_argument("--num-experts", type=int, default=8)
    up.add_argument("--top-k", type=int, default=2)
    up.add_argument("--moe-layers", type=_moe_layers, default="all", help="all | every-other | 0,2,5")
    up.add_argument("--granularity", type=int, default=1, help="split the dense MLP into G fine-grained experts")
    up.add_argument("--shared-experts", type=int, default=0)
    up.add_argument("--shared-expert-gate", action="store_true")
    up.add_argument("--init", default="copy", help="copy | noise:STD | drop:R")
    up.add_argument("--router-init", default="normal", choices=["normal", "zeros", "kmeans"])
    up.add_argument("--calibration-file", default=None, help="text for --router-init kmeans")
    up.add_argument("--calibration-tokens", type=int, default=4096)
    up.add_argument("--no-norm-topk-prob", dest="norm_topk_prob", action="store_false",
                    help="do not renormalise the top-k weights (changes the function)")
    up.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    up.add_argument("--max-shard-size", default="5GB")
    up.add_argument("--verify", action="store_true", help="compare dense and MoE logits after converting")
    up.add_argument("--overwrite", action="store_true")
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--base-model", default=None, help="hub id of the source, for the model card")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = UpcycleConfig(
            num_experts=args.num_experts, top_k=args.top_k, moe_layers=args.moe_layers, granularity=args.granularity,
            shared_experts=args.shared_experts, shared_expert_gate=args.shared_expert_gate, init=args.init,
            router_init=args.router_init, calibration_file=args.calibration_file,
            calibration_tokens=args.calibration_tokens, norm_topk_prob=args.norm_topk_prob, dtype=args.dtype,
            max_shard_size=args.max_shard_size, verify=args.verify, overwrite=args.overwrite, seed=args.seed,
            base_model=args.base_model,
        )
        report = upcycle(args.source, args.output, cfg)
    except (ValueError, FileExistsError, SourceError) as e:
        print(f"hf-moe upcycle: error: {e}", file=sys.stderr)
        return 2
    print(report)
    if report.max_abs_diff is not None:
        if cfg.preserves_function:
            print(f"verified: the MoE computes the dense model's function (relative difference "
                  f"{report.max_rel_diff:.2e}).")
        else:
            print(f"note: these settings change the function by design; measured relative difference "
                  f"{report.max_rel_diff:.2e}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
