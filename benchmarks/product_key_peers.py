"""Gather the peers of `python -m benchmarks product-key` into an ignored folder (default `.peers/`), on a machine
with network access; the benchmark machine reads them from there (`--peers` / `HF_MOE_PEERS`) and needs none.

    python -m benchmarks.product_key_peers --flash-moe-git /path/to/flash-moe/.git

- `flash_moe/`: the files FlashMoE's `FlashMoE` module imports, read with `git show` from a clone of
  github.com/flash-algo/flash-moe (its LICENSE copied along);
- `wheels/`: `pip download --no-deps` of peer-pytorch and its pure-Python dependencies (einops, einx, frozendict);
  the benchmark unpacks them into a temporary folder on `sys.path`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

FLASH_MOE_FILES = (
    "LICENSE",
    "flash_moe/__init__.py",
    "flash_moe/modules/flash_moe.py",
    "flash_moe/ops/utils.py",
    "flash_moe/ops/triton/flash_mlp.py",
    "flash_moe/ops/triton/flash_router.py",
    "flash_moe/ops/triton/flash_expert.py",
)
WHEELS = ("peer-pytorch", "einops", "einx", "frozendict")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flash-moe-git", required=True, help="git directory of a flash-moe clone (or mirror)")
    parser.add_argument("--revision", default="HEAD")
    parser.add_argument("--out", default=".peers")
    args = parser.parse_args()
    out = Path(args.out)
    for name in FLASH_MOE_FILES:
        text = subprocess.run(["git", "--git-dir", args.flash_moe_git, "show", f"{args.revision}:{name}"],
                              check=True, capture_output=True).stdout
        target = out / "flash_moe" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text)
    for package in ("flash_moe/modules", "flash_moe/ops", "flash_moe/ops/triton"):
        (out / "flash_moe" / package / "__init__.py").touch()
    revision = subprocess.run(["git", "--git-dir", args.flash_moe_git, "rev-parse", args.revision], check=True,
                              capture_output=True, text=True).stdout.strip()
    (out / "flash_moe" / "REVISION").write_text(revision + "\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(out / "wheels"), *WHEELS],
                   check=True)
    print(f"peers in {out}: flash_moe at {revision}, wheels {sorted(p.name for p in (out / 'wheels').iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
