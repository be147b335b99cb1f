"""A foreign checkpoint folder: its family, its config read by transformers' own class, the equivalent `HfMoeConfig`,
and reading hf-moe tensors (or one rank's expert rows of them) out of its files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from ..checkpoint_files import SafetensorsReader
from ..configuration_hf_moe import HfMoeConfig
from .family import FAMILIES, InteropError, MoeFamily
from .plan import TensorPlan, check_against, tensor_plans

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# config.json fields that tell a loader where to find code, not what the model computes: `auto_map` names the
# checkpoint's own classes for `trust_remote_code`; hf-moe reads the config with transformers' class, as AutoConfig
# does without remote code.
_LOADER_FIELDS = frozenset({"auto_map"})


def checkpoint_model_type(path: str | os.PathLike) -> str | None:
    """The `model_type` in a local folder's config.json (None when it is no local folder with one)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        return json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise InteropError(f"{config_path} is not valid JSON ({err}).") from err


def unhandled_fields(family: MoeFamily, cfg: PretrainedConfig) -> dict[str, Any]:
    """Family-specific fields of `cfg` the family's mapping does not handle and whose value is not the default of
    the family's config class (a field hf-moe does not know may change what the model computes)."""
    generic = set(PretrainedConfig().to_dict()) | _LOADER_FIELDS
    defaults = family.foreign_config().to_dict()
    return {k: v for k, v in cfg.to_dict().items()
            if k not in generic and k not in family.handled_fields and defaults.get(k) != v}


def to_hf_moe_config(family: MoeFamily, cfg: PretrainedConfig, **overrides: Any) -> HfMoeConfig:
    """The `HfMoeConfig` that computes what `cfg` computes; refuses what the family mapping cannot express."""
    unknown = unhandled_fields(family, cfg)
    if unknown:
        raise InteropError(f"{family.model_type}: config field(s) {unknown} are not known to hf-moe's "
                           f"{family.model_type} mapping, which cannot tell whether they change the model; "
                           "refusing rather than ignoring them.")
    fields = {**family.to_hf_moe(cfg), **overrides}
    try:
        config = HfMoeConfig(**fields)
    except ValueError as err:
        raise InteropError(f"{family.model_type}: the mapped config is not a valid HfMoeConfig: {err}") from err
    config.architectures = ["HfMoeForCausalLM"]
    config.dtype = getattr(cfg, "dtype", None)
    return config


@dataclass
class ForeignCheckpoint:
    """A transformers checkpoint folder of a registered family (see `hf_moe.interop.FAMILIES`)."""

    path: Path
    family: MoeFamily
    config: PretrainedConfig
    reader: SafetensorsReader

    @classmethod
    def open(cls, path: str | os.PathLike) -> ForeignCheckpoint:
        model_type = checkpoint_model_type(path)
        if model_type not in FAMILIES:
            raise InteropError(f"{path}: model_type={model_type!r} is not a family hf-moe imports; supported: "
                               f"{', '.join(sorted(FAMILIES))}.")
        config = AutoConfig.from_pretrained(path)
        return cls(Path(path), FAMILIES[model_type], config, SafetensorsReader(path))

    def hf_moe_config(self, **overrides: Any) -> HfMoeConfig:
        return to_hf_moe_config(self.family, self.config, **overrides)

    def plans(self, expected: dict[str, tuple[int, ...]], config: HfMoeConfig) -> list[TensorPlan]:
        """The checked plan of every tensor in `expected` (the hf-moe model's names and full shapes)."""
        have = {name: info.shape for name, info in self.reader.tensors.items()}
        fused = {name for name in have if name.endswith((".gate_up_proj", ".down_proj"))}
        family = self.family
        if any(f".{family.fused_moe_module}.{family.experts}." in name for name in fused):
            family = replace(family, moe_module=family.fused_moe_module)  # a state dict saved as transformers holds it
        plans = tensor_plans(family, expected, config.moe_layer_indices, fused)
        ignored = (lambda name: self.family.ignored(self.config, name)) if self.family.ignored else (lambda name: False)
        check_against(plans, self.family, have, str(self.path), config.tie_word_embeddings, ignored)
        wanted = {name for plan in plans for name in plan.foreign_names}
        odd = sorted({str(self.reader.tensors[n].dtype) for n in wanted} - {str(d) for d in _FLOAT_DTYPES})
        if odd:
            raise InteropError(f"{self.path}: tensors of dtype {odd}; hf-moe imports float checkpoints only "
                               "(quantized checkpoints are not supported).")
        return plans

    def read(self, plan: TensorPlan, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """The hf-moe tensor of `plan`; for expert tensors only experts `[start, end)` when given."""
        if not plan.experts:
            return self.reader.get(plan.sources[0][0]).reshape(plan.shape)
        if not plan.per_expert:
            return self.reader.get(plan.sources[0][0], start, end)
        experts = plan.sources[slice(start, end)]
        return torch.stack([torch.cat(self.reader.get_many(list(parts))) for parts in experts])
