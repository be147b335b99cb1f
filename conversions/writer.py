"""Streaming safetensors output: tensors go into a shard buffer that is written as soon as it is full."""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' → 5·10⁹ bytes, '500MiB' → 500·2²⁰; an int is taken as bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"max_shard_size={text!r} is not a size; expected e.g. '5GB', '500MB' or '2GiB'.")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


class ShardWriter:
    """Writes tensors into `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_size` bytes.

    Peak memory is one shard buffer: tensors are released once their shard is on disk. Shards are renamed to
    their final `-of-N` names and the index is written by `finish()`, when N is known.
    """

    def __init__(self, folder: str, max_shard_size: int) -> None:
        self.folder = folder
        self.max_shard_size = max_shard_size
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_shard_size:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.buffer:
            return
        path = os.path.join(self.folder, f"shard-{len(self.shards):05d}.tmp")
        save_file(self.buffer, path, metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name and write the index; returns the file names."""
        self.flush()
        count = len(self.shards)
        if count == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for i, name in enumerate(names):
            os.replace(os.path.join(self.folder, f"shard-{i:05d}.tmp"), os.path.join(self.folder, name))
        if count > 1:
            weight_map = {tensor: names[i] for i, tensors in enumerate(self.shards) for tensor in tensors}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        return names
