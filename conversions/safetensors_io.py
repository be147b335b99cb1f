"""Streaming safetensors I/O: read one tensor at a time, write shards whose tensors are produced piece by piece.

Reading opens the shard with `safe_open` for each tensor, so no file stays memory-mapped (mapped pages count
towards the process's resident memory). Writing lays out each shard's header up front from the planned
names, dtypes and shapes, then streams every tensor's bytes in row blocks as they are produced: peak memory
is one block, never a shard.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_moe.checkpoint_files import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, SafetensorsReader, TensorInfo

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
}
def parse_size(size: int | str) -> int:
    """`5GB` → 5·10⁹ bytes, `2GiB` → 2·2³⁰ (as in transformers' `max_shard_size`); ints pass through."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"max_shard_size={size!r} is invalid: expected bytes as an integer or a size such as "
                             f"'500MB', '5GB' or '2GiB'.")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} is invalid: expected a positive size.")
    return value

__all__ = ["PlannedTensor", "SafetensorsReader", "TensorInfo", "parse_size", "plan_shards", "shard_file_names",
           "whole", "write_shards"]


@dataclass
class PlannedTensor:
    """One output tensor: its name, shape, dtype and a producer yielding row blocks (along dim 0) in order."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], Iterable[torch.Tensor]]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Greedy sharding in order; a tensor larger than the limit gets a shard of its own (as in transformers)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def _header(tensors: list[PlannedTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_tensor(f, planned: PlannedTensor) -> None:
    written = 0
    for block in planned.produce():
        if block.dtype != planned.dtype or tuple(block.shape[1:]) != planned.shape[1:]:
            raise RuntimeError(f"internal error: {planned.name} produced a {block.dtype} block of shape "
                               f"{tuple(block.shape)}, planned {planned.dtype} {planned.shape}")
        data = block.detach().contiguous().view(torch.uint8).numpy()
        f.write(data.data)
        written += data.nbytes
    if written != planned.nbytes:
        raise RuntimeError(f"internal error: {planned.name} produced {written} bytes, planned {planned.nbytes}")


def write_shards(folder: Path, shards: list[list[PlannedTensor]],
                 progress: Callable[[str, PlannedTensor], None]) -> None:
    """Write the planned shards (and an index when there are several) into `folder`, tensor by tensor;
    `progress(shard_name, tensor)` is called after each tensor."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; writing them from a big-endian host is unsupported.")
    names = shard_file_names(len(shards))
    for name, tensors in zip(names, shards):
        with open(folder / name, "wb") as f:
            f.write(_header(tensors))
            for t in tensors:
                _write_tensor(f, t)
                progress(name, t)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for s in shards for t in s),
                         "total_parameters": sum(t.numel for s in shards for t in s)},
            "weight_map": {t.name: name for name, tensors in zip(names, shards) for t in tensors},
        }
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def whole(tensor_fn: Callable[[], torch.Tensor]) -> Callable[[], Iterator[torch.Tensor]]:
    """A producer that yields one tensor computed on demand."""

    def produce() -> Iterator[torch.Tensor]:
        yield tensor_fn()

    return produce
