"""The `hf-moe` command line: `hf-moe upcycle SRC OUT --num-experts 8 --top-k 2 [...]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .safetensors_io import CheckpointError
from .sources import SUPPORTED_TEXT, UnsupportedSourceError
from .upcycling import DTYPES, ROUTER_INITS, UpcycleConfig, UpcycleError, upcycle


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe", description="hf-moe tools for Mixture-of-Experts checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "upcycle",
        help="turn a dense checkpoint into an hf-moe mixture-of-experts checkpoint",
        description=f"Upcycle a dense checkpoint folder (safetensors; {SUPPORTED_TEXT}) into an hf-moe MoE "
                    f"checkpoint folder, streaming one tensor at a time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = UpcycleConfig()
    up.add_argument("src", help="dense checkpoint folder (config.json + safetensors)")
    up.add_argument("out", help="output folder (must be empty or absent unless --overwrite)")
    up.add_argument("--num-experts", type=int, default=defaults.num_experts, help="routed experts per MoE layer")
    up.add_argument("--top-k", type=int, default=defaults.top_k, help="experts per token")
    up.add_argument("--moe-layers", default=defaults.moe_layers,
                    help="'all', 'every-other' (0, 2, 4, ...) or comma-separated layer indices")
    up.add_argument("--granularity", type=int, default=defaults.granularity,
                    help="G: fine-grained experts of width intermediate_size/G (virtual groups; top-k a multiple of G)")
    up.add_argument("--shared-experts", type=int, default=defaults.shared_experts,
                    help="shared experts of width intermediate_size/G (a multiple of G)")
    up.add_argument("--shared-expert-gate", action="store_true",
                    help="sigmoid gate on the shared experts, zero-initialised (σ(0) = ½)")
    up.add_argument("--init", default=defaults.init, help="copy | noise:STD | drop:R (Drop-Upcycling)")
    up.add_argument("--router-init", default=defaults.router_init, choices=ROUTER_INITS)
    up.add_argument("--calibration-file", default=None, help="text file for --router-init kmeans")
    up.add_argument("--calibration-tokens", type=int, default=defaults.calibration_tokens,
                    help="at most this many calibration tokens")
    up.add_argument("--calibration-seq-len", type=int, default=defaults.calibration_seq_len,
                    help="calibration sequence length")
    up.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPES), help="output dtype")
    up.add_argument("--max-shard-size", default=defaults.max_shard_size, help="e.g. 5GB, 500MB, 4GiB")
    up.add_argument("--verify", action="store_true",
                    help="compare dense and MoE logits on random tokens (float32, layer by layer)")
    up.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder once done")
    up.add_argument("--seed", type=int, default=defaults.seed)
    up.add_argument("--base-model", default=None, help="hub id for the model card (default: source folder name)")
    up.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = UpcycleConfig(
        num_experts=args.num_experts, top_k=args.top_k, moe_layers=args.moe_layers, granularity=args.granularity,
        shared_experts=args.shared_experts, shared_expert_gate=args.shared_expert_gate, init=args.init,
        router_init=args.router_init, calibration_file=args.calibration_file,
        calibration_tokens=args.calibration_tokens, calibration_seq_len=args.calibration_seq_len, dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        verify=args.verify, overwrite=args.overwrite, seed=args.seed, base_model=args.base_model,
        progress=not args.no_progress,
    )
    try:
        result = upcycle(args.src, args.out, config)
    except (UpcycleError, UnsupportedSourceError, CheckpointError) as err:
        print(f"hf-moe upcycle: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-moe upcycle: interrupted; nothing was written.", file=sys.stderr)
        return 130
    print(result.summary())
    return 0
