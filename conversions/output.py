"""Where a conversion writes: an output folder that appears complete or not at all, and the files of the source
folder (tokenizer, chat template, generation config) carried over unchanged. Shared by `upcycle` and `convert`."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Files of the source folder that are not carried over: weights (rewritten), the config and card (regenerated),
# remote code (hf-moe is the code) and pickles (never touched).
_NOT_COPIED = re.compile(r"(.*\.(safetensors|bin|pt|pth|ckpt|pkl|h5|msgpack|gguf|py)|model\.safetensors\.index\.json|"
                         r"pytorch_model\.bin\.index\.json|config\.json|README\.md|\..*)")


def new_folder(parent: Path, prefix: str, suffix: str) -> Path:
    """A new, uniquely named folder in `parent` with the permissions a plain mkdir gives (the umask applies, unlike
    mkdtemp's 0700, so the finished output is as readable as any folder the user creates)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


@contextmanager
def atomic_output(out: Path, kind: str = "upcycling") -> Iterator[Path]:
    """An empty folder to write into whose contents become `out` on success and vanish on any error or interrupt,
    leaving `out` as it was (the temporary folder's name ends in `.{kind}`).

    A new `out` is a sibling folder renamed into place in one step. An existing `out` (empty, or replaced with
    overwrite) keeps its own folder, since it may be the working directory or a mount point, which cannot be
    renamed: the new files are written into a hidden folder inside it and moved up once complete, after its old
    entries were moved aside (and back, should a move fail).
    """
    out = Path(os.path.abspath(out))  # "." and ".." name a folder that has a parent to write beside
    if out.is_dir():
        yield from _replace_contents(out, kind)
        return
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_folder(out.parent, f".{out.name}.", f".{kind}")
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _replace_contents(out: Path, kind: str) -> Iterator[Path]:
    """`atomic_output` for an existing folder `out` (see there)."""
    tmp = new_folder(out, ".hf-moe.", f".{kind}")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = new_folder(out, ".hf-moe.", ".replaced")
    moved_old, moved_new = [], []
    try:
        for entry in out.iterdir():
            if entry not in (tmp, old):
                os.replace(entry, old / entry.name)
                moved_old.append(entry.name)
        for entry in tmp.iterdir():
            os.replace(entry, out / entry.name)
            moved_new.append(entry.name)
    except BaseException:
        for name in moved_new:
            os.replace(out / name, tmp / name)
        for name in moved_old:
            os.replace(old / name, out / name)
        shutil.rmtree(tmp, ignore_errors=True)
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)
    os.rmdir(tmp)


def check_output(src: Path, out: Path, overwrite: bool, error: type[Exception]) -> None:
    """Refuse (raising `error`) an output that is a file, the source, non-empty without `overwrite`, or holds the
    source."""
    if out.exists() and not out.is_dir():
        raise error(f"output {out} exists and is not a folder.")
    if out.resolve() == src.resolve():
        raise error(f"output {out} is the source folder; write the MoE model somewhere else.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise error(f"output folder {out} is not empty; pass --overwrite (overwrite=True) to replace it.")
    if out.exists() and overwrite and out.resolve() in src.resolve().parents:
        raise error(f"output {out} contains the source {src}; overwriting it would delete the source.")


def copy_side_files(src: Path, out: Path) -> tuple[list[str], list[str]]:
    """Copy the source folder's files other than weights, config, card, code and hidden files (tokenizer, chat
    template, generation config, ...) byte for byte; returns (copied names, skipped names)."""
    copied, skipped = [], []
    for entry in sorted(Path(src).iterdir()):
        if entry.is_file() and not _NOT_COPIED.fullmatch(entry.name):
            shutil.copyfile(entry, out / entry.name)
            copied.append(entry.name)
        elif entry.name not in ("config.json", "README.md") and not _is_weight_file(entry.name):
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
    return copied, skipped


def _is_weight_file(name: str) -> bool:
    return bool(re.fullmatch(r".*\.(safetensors|bin|pt|pth|ckpt)|.*\.index\.json", name))
