"""The vocabulary of a conversion (`conversions.converting.convert`): its result and its error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import PretrainedConfig

from hf_moe.interop import InteropError


class ConvertError(InteropError):
    """The conversion cannot be done exactly or as asked; nothing was written."""


@dataclass
class ConvertResult:
    """What `convert` wrote."""

    output: Path
    source_type: str
    target_type: str
    config: PretrainedConfig
    total_parameters: int
    num_shards: int
    cast_to: str | None = None
    """The dtype every weight was cast to (`None`: each kept its own)."""
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"converted {self.source_type} -> {self.target_type}: {self.output}",
                 f"  architectures: {self.config.architectures}, {self.total_parameters:,} parameters in "
                 f"{self.num_shards} shard(s)",
                 f"  copied: {', '.join(self.copied_files) or 'nothing'}"]
        if self.skipped_files:
            lines.append(f"  not copied: {', '.join(self.skipped_files)}")
        return "\n".join(lines)
