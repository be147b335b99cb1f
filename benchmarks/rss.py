"""Peak host memory of a streaming converter vs. a load-everything one, each step in a fresh process: what the
converter-memory suites (`upcycle-memory`, `convert-memory`) share.

A suite runs every step (`generate`, `streaming`, `naive`) as `python -m benchmarks <suite> ... --child MODE SRC OUT`,
so one step's peak RSS cannot hide another's; the child prints one JSON line that `run_child` returns.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .record import ResultFile

REPO = Path(__file__).resolve().parent.parent


def rss_now() -> int:
    """This process's resident set now, in bytes (0 where /proc does not say)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """This process's peak resident set, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def report_step(mode: str, step: Callable[[], object], out: Path) -> None:
    """Run `step` in this child process and print its row: peak RSS, RSS before it (after the imports), seconds and
    the bytes of safetensors it wrote under `out`."""
    baseline = rss_now()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"mode": mode, "peak_rss": peak_rss(), "baseline_rss": baseline, "seconds": seconds,
                      "bytes_written": written}))


Step = Callable[[Path, Path, argparse.Namespace], None]


def suite_parser(description: str, *, hidden: int, layers: int, max_shard_size: str) -> argparse.ArgumentParser:
    """The arguments every converter-memory suite takes (its own shape arguments are added by the suite)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-shard-size", default=max_shard_size)
    parser.add_argument("--workdir", default=None, help="where to put the checkpoints (default: a temp folder)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "OUT"), help=argparse.SUPPRESS)
    return parser


def parse_or_run_child(parser: argparse.ArgumentParser, steps: dict[str, Step]) -> argparse.Namespace | None:
    """The suite's arguments; or, when this process is a child (`--child MODE SRC OUT`), run step MODE, print its
    row (`report_step`) and return None."""
    args = parser.parse_args()
    if args.hidden < 128 or args.hidden % 128:
        parser.error(f"--hidden {args.hidden}: expected a multiple of 128 (the attention heads are 128 wide)")
    if not args.child:
        return args
    mode, src, out = args.child
    src, out = Path(src), Path(out)
    report_step(mode, lambda: steps[mode](src, out, args), out)
    return None


def run_child(suite: str, mode: str, src: Path, out: Path, argv: list[str]) -> dict[str, Any]:
    """Run step `mode` of `suite` (with the suite's own arguments `argv`) in a fresh process; its row."""
    cmd = [sys.executable, "-m", "benchmarks", suite, *argv, "--child", mode, str(src), str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def streaming_against_naive(suite: str, src: Path, workdir: Path, argv: list[str], record: ResultFile) -> dict[str, dict[str, Any]]:
    """Run the `streaming` and the `naive` step of `suite` on `src`, each in a fresh process writing under
    `workdir/<mode>`; print and `record.write` their rows and check that both wrote the same tensors."""
    results = {}
    for mode in ("streaming", "naive"):
        results[mode] = run_child(suite, mode, src, workdir / mode, argv)
        print(json.dumps(results[mode]), flush=True)
        record.write(results[mode])
    print(f"outputs identical: {same_tensors(workdir / 'streaming', workdir / 'naive')} tensors compared")
    return results


def print_table(results: dict[str, dict[str, Any]], write_rate: bool = False) -> None:
    """One line per step: peak RSS, peak above the imports, time (and write throughput when `write_rate`)."""
    rate_header = f" {'write GB/s':>11}" if write_rate else ""
    print(f"{'path':<10} {'peak RSS':>10} {'above imports':>14} {'time':>8}{rate_header}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['peak_rss'] / 2**30:>8.2f}GiB {(r['peak_rss'] - r['baseline_rss']) / 2**30:>11.2f}GiB "
              f"{r['seconds']:>7.1f}s" + (f" {r['bytes_written'] / r['seconds'] / 1e9:>11.3f}" if write_rate else ""))


def save_in_memory_shards(state: dict, config: Any, out: Path, max_shard_size: str) -> None:
    """The load-everything converter's save: `state` (held whole in memory) cut into shards of at most
    `max_shard_size` in order, each written with `safetensors.torch.save_file`, with an index when there are several."""
    from safetensors.torch import save_file

    from conversions.safetensors_io import parse_size, shard_file_names

    limit, shards, size = parse_size(max_shard_size), [{}], 0
    for name, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    out.mkdir()
    config.save_pretrained(out)
    files = shard_file_names(len(shards))
    for file, shard in zip(files, shards):
        save_file(shard, out / file, metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def same_tensors(a: Path, b: Path) -> int:
    """Compare every tensor of two checkpoints one at a time; returns how many were compared."""
    import torch

    from conversions.safetensors_io import SafetensorsReader

    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    if set(ra.tensors) != set(rb.tensors):
        raise SystemExit(f"outputs hold different tensors: {sorted(set(ra.tensors) ^ set(rb.tensors))[:5]}")
    for name in ra.tensors:
        if not torch.equal(ra.get(name), rb.get(name)):
            raise SystemExit(f"outputs differ in {name}")
    return len(ra.tensors)
