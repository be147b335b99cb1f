"""Which file of a safetensors checkpoint folder holds each tensor, and reading them one at a time: the one reader of
`model.safetensors` and `model.safetensors.index.json` that hf-moe's loaders and its converters share."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Weights in pickle formats: named in the error, never opened (unpickling can run arbitrary code).
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
_DTYPES_BY_NAME = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                   "I64": torch.int64, "I32": torch.int32, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, incomplete or unreadable."""


def tensor_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Tensor name → the safetensors file in `folder` that holds it.

    Reads the sharded index `model.safetensors.index.json` if present, else the single `model.safetensors`.
    Every shard the index names must exist, be readable and hold the tensors the index maps to it; anything
    else raises `CheckpointError` naming the folder and file.
    """
    folder = Path(folder)
    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = {name: folder / file for name, file in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({err}).") from err
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"shard(s) {', '.join(missing)} listed in {index_path.name} are missing from "
                                  f"{folder}.")
        held = {path: _tensor_names(path) for path in sorted(set(files.values()))}
        wrong = [name for name, path in files.items() if name not in held[path]]
        if wrong:
            raise CheckpointError(f"{index_path.name} maps {len(wrong)} tensor(s) to shards that do not hold them "
                                  f"(first: {wrong[:5]}); the checkpoint is incomplete or corrupt.")
        return files
    single = folder / SAFE_WEIGHTS_NAME
    if not single.is_file():
        raise CheckpointError(_no_safetensors_message(folder))
    return dict.fromkeys(_tensor_names(single), single)


def _tensor_names(path: Path) -> set[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt — "
                              f"re-download it.") from err


def _no_safetensors_message(folder: Path) -> str:
    if not folder.is_dir():
        return f"checkpoint folder {folder} does not exist."
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        return (f"{folder} holds only pickle weights ({', '.join(pickles)}), which hf-moe never loads because "
                f"unpickling can run arbitrary code. Convert them to safetensors first (for example "
                f"`model = AutoModelForCausalLM.from_pretrained(src); model.save_pretrained(dst)` in an environment "
                f"you trust), then use the safetensors copy.")
    return (f"{folder} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}; expected a transformers "
            f"checkpoint folder saved with safetensors.")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | str


class SafetensorsReader:
    """Index of the tensors in a folder's `model.safetensors` or sharded `model.safetensors.index.json`.

    Every shard named by the index must exist and parse ([`tensor_files`]); `get` reads one tensor (or the rows
    `[start, end)` of its dim 0) and releases the file, so no shard stays memory-mapped.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        files = tensor_files(self.folder)
        self.tensors: dict[str, TensorInfo] = {}
        for path in sorted(set(files.values())):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                    piece = f.get_slice(key)
                    self.tensors[key] = TensorInfo(path, tuple(piece.get_shape()),
                                                   _DTYPES_BY_NAME.get(piece.get_dtype(), piece.get_dtype()))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Read one tensor into memory (a private copy, not a view of a mapped file); with `start`/`end`, only the
        rows `[start, end)` of its first dimension are read."""
        info = self.tensors[name]
        with safe_open(info.file, framework="pt") as f:
            if start is None and end is None:
                return f.get_tensor(name)
            return f.get_slice(name)[start:end]

    def get_many(self, names: list[str]) -> list[torch.Tensor]:
        """Read several whole tensors, opening each file once (one expert's projections live side by side)."""
        out: dict[str, torch.Tensor] = {}
        for file in dict.fromkeys(self.tensors[name].file for name in names):
            with safe_open(file, framework="pt") as f:
                out.update({name: f.get_tensor(name) for name in names if self.tensors[name].file == file})
        return [out[name] for name in names]
