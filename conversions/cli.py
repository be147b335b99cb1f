"""The `hf-moe` command line: `hf-moe upcycle SRC OUT --num-experts 8 --top-k 2 [...]` and
`hf-moe convert SRC OUT [--to hf_moe|mixtral|qwen2_moe|qwen3_moe|olmoe|glm4_moe|deepseek_v3|deepseek_v2|ernie4_5_moe|
hunyuan_v1_moe|auto]`.

Building the parser imports neither torch nor transformers (`--help` and `--version` answer at once); the
converter is imported when a command runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from types import FrameType
from typing import Any

from .upcycle_types import CONVERT_TARGETS, DTYPE_NAMES, ROUTER_INITS, SUPPORTED_TEXT, UpcycleConfig


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except to on/off flags and where X is None (the help then says
    what None means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class _VersionAction(argparse.Action):
    """`--version`: the installed distribution's version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the hf-moe version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args) -> None:
        try:
            version = metadata.version("hf-moe")
        except metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
            from hf_moe import __version__ as version
        print(f"hf-moe {version}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-moe", description="hf-moe tools for Mixture-of-Experts checkpoints.")
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "upcycle",
        help="turn a dense checkpoint into an hf-moe mixture-of-experts checkpoint",
        description=f"Upcycle a dense checkpoint folder (safetensors; {SUPPORTED_TEXT}) into an hf-moe MoE "
                    f"checkpoint folder, streaming one tensor at a time.",
        formatter_class=_DefaultsHelpFormatter,
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
    up.add_argument("--router-init", default=defaults.router_init, choices=ROUTER_INITS,
                    help="router rows: normal = N(0, initializer_range²) per virtual group; zeros = uniform "
                         "routing; kmeans = k-means centroids of the dense MLP inputs over --calibration-file")
    up.add_argument("--calibration-file", default=None, help="text file for --router-init kmeans")
    up.add_argument("--calibration-tokens", type=int, default=defaults.calibration_tokens,
                    help="at most this many calibration tokens")
    up.add_argument("--calibration-seq-len", type=int, default=defaults.calibration_seq_len,
                    help="calibration sequence length")
    up.add_argument("--dtype", default=defaults.dtype, choices=sorted(DTYPE_NAMES),
                    help="output dtype (auto: the source's)")
    up.add_argument("--max-shard-size", default=defaults.max_shard_size, help="e.g. 5GB, 500MB, 4GiB")
    up.add_argument("--verify", action="store_true",
                    help="compare dense and MoE logits on random tokens (float32, layer by layer)")
    up.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder once done")
    up.add_argument("--seed", type=int, default=defaults.seed,
                    help="seeds every random choice (router rows, noise, dropped neurons, k-means): the same seed "
                         "and settings give the same weights")
    up.add_argument("--base-model", default=None, help="hub id for the model card (default: source folder name)")
    up.add_argument("--no-progress", action="store_true", help="hide progress bars")
    conv = commands.add_parser(
        "convert",
        help="convert an MoE checkpoint between hf-moe and mixtral/qwen2_moe/qwen3_moe/olmoe/glm4_moe/deepseek_v3/"
             "deepseek_v2/ernie4_5_moe/hunyuan_v1_moe, exactly",
        description="Convert an MoE checkpoint folder (safetensors; hf_moe, mixtral, qwen2_moe, qwen3_moe, olmoe, "
                    "glm4_moe, deepseek_v3, deepseek_v2, ernie4_5_moe or hunyuan_v1_moe) into another layout, "
                    "streaming one tensor at a time. The result computes the same logits; what the target family "
                    "cannot express is refused and nothing is written.",
        formatter_class=_DefaultsHelpFormatter,
    )
    conv.add_argument("src", help="MoE checkpoint folder (config.json + safetensors)")
    conv.add_argument("out", help="output folder (must be empty or absent unless --overwrite)")
    conv.add_argument("--to", default="hf_moe", choices=CONVERT_TARGETS,
                      help="layout to write: hf_moe, a family (what transformers' own class and serving engines "
                           "load), or auto (the source's family, else the first family that expresses the model)")
    conv.add_argument("--dtype", default="auto", choices=sorted(DTYPE_NAMES),
                      help="output dtype (auto: each tensor's own)")
    conv.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 4GiB")
    conv.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder once done")
    conv.add_argument("--base-model", default=None, help="hub id for the model card (default: source folder name)")
    conv.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "convert":
        return _convert(args)
    config = UpcycleConfig(
        num_experts=args.num_experts, top_k=args.top_k, moe_layers=args.moe_layers, granularity=args.granularity,
        shared_experts=args.shared_experts, shared_expert_gate=args.shared_expert_gate, init=args.init,
        router_init=args.router_init, calibration_file=args.calibration_file,
        calibration_tokens=args.calibration_tokens, calibration_seq_len=args.calibration_seq_len, dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        verify=args.verify, overwrite=args.overwrite, seed=args.seed, base_model=args.base_model,
        progress=not args.no_progress,
    )
    from hf_moe.checkpoint_files import CheckpointError

    from .sources import UnsupportedSourceError
    from .upcycle_types import UpcycleError
    from .upcycling import upcycle

    return _run("upcycle", args.out, (UpcycleError, UnsupportedSourceError, CheckpointError),
                lambda: upcycle(args.src, args.out, config))


def _convert(args: argparse.Namespace) -> int:
    from hf_moe.checkpoint_files import CheckpointError
    from hf_moe.interop import InteropError

    from .converting import convert

    return _run("convert", args.out, (InteropError, CheckpointError), lambda: convert(
        args.src, args.out, args.to, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        progress=not args.no_progress, base_model=args.base_model))


def _run(command: str, out: str, user_errors: tuple[type[Exception], ...], work: Callable[[], Any]) -> int:
    """Run one writing command: its summary and 0, or one line on stderr and the exit status. Bad input (`user_errors`)
    is 2; a read-only or full disk 1; SIGINT / SIGTERM 128 + the signal. The output folder is as it was on every
    failure (the writers are atomic)."""
    try:
        with _sigterm_unwinds():
            result = work()
    except user_errors as err:
        print(f"hf-moe {command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f": {err.filename}" if err.filename else f" (writing {out})"
        print(f"hf-moe {command}: error: {err.strerror or err}{where}; nothing was written.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hf-moe {command}: interrupted; nothing was written.", file=sys.stderr)
        return 128 + signal.SIGINT
    except _Terminated:
        print(f"hf-moe {command}: terminated; nothing was written.", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(result.summary())
    return 0


class _Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it and the
    conversion unwinds the same way as on Ctrl-C, removing its partial output."""


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into `_Terminated` while the block runs (signal handlers can only be set in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
