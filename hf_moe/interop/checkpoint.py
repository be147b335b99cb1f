"""A foreign checkpoint folder: its family, its config read by transformers' own class, the equivalent `HfMoeConfig`,
and reading hf-moe tensors (or one rank's expert rows of them) out of its files, FP8 ones dequantized (`fp8`). A
vision-language checkpoint around a family's language model (`wrappers`) is read as that language model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from ..checkpoint_files import SafetensorsReader
from ..configuration_hf_moe import HfMoeConfig
from .family import FAMILIES, InteropError, MoeFamily
from .fp8 import FLOAT_DTYPES, Fp8Blocks, compute_dtype, fp8_blocks, read_dequantized, scale_pairs
from .plan import TensorPlan, check_against, tensor_plans
from .wrappers import WRAPPERS, LanguageModelTensors

# config.json fields that tell a loader where to find code, not what the model computes: `auto_map` names the
# checkpoint's own classes for `trust_remote_code`; hf-moe reads the config with transformers' class, as AutoConfig
# does without remote code.
_LOADER_FIELDS = frozenset({"auto_map"})


def checkpoint_model_type(path: str | os.PathLike) -> str | None:
    """The `model_type` hf-moe reads a local folder as (None when it is no local folder with a config.json): its
    config.json's, or for a vision-language checkpoint around a family's language model (`wrappers.WRAPPERS`), that
    family's; refuses such a checkpoint whose text model is no family's."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{config_path} is not valid JSON ({err}).") from err
    wrapper = WRAPPERS.get(config.get("model_type"))
    if wrapper is None:
        return config.get("model_type")
    return wrapper.family_type((config.get("text_config") or {}).get("model_type"))


def unhandled_fields(family: MoeFamily, cfg: PretrainedConfig) -> dict[str, Any]:
    """Family-specific fields of `cfg` the family's mapping does not handle and whose value is not the default of
    the family's config class (a field hf-moe does not know may change what the model computes).
    `quantization_config` is the FP8 reader's (`fp8_blocks`)."""
    generic = set(PretrainedConfig().to_dict()) | _LOADER_FIELDS | {"quantization_config"}
    defaults = family.foreign_config().to_dict()
    return {k: v for k, v in cfg.to_dict().items()
            if k not in generic and k not in family.handled_fields and defaults.get(k) != v}


def to_hf_moe_config(family: MoeFamily, cfg: PretrainedConfig, **overrides: Any) -> HfMoeConfig:
    """The `HfMoeConfig` that computes what `cfg` computes; refuses what the family mapping cannot express. A
    quantized checkpoint's config is unquantized, in the dtype the checkpoint computes in (never float8)."""
    blocks = fp8_blocks(cfg)
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
    config.dtype = getattr(cfg, "dtype", None) if blocks is None else compute_dtype(cfg)
    return config


@dataclass
class ForeignCheckpoint:
    """A transformers checkpoint folder of a registered family (see `hf_moe.interop.FAMILIES`); `scales` maps each
    FP8 tensor to its block scales (empty for a float checkpoint)."""

    path: Path
    family: MoeFamily
    config: PretrainedConfig
    reader: SafetensorsReader | LanguageModelTensors
    blocks: Fp8Blocks | None = None
    scales: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike) -> ForeignCheckpoint:
        model_type = checkpoint_model_type(path)
        if model_type not in FAMILIES:
            raise InteropError(f"{path}: model_type={model_type!r} is not a family hf-moe imports; supported: "
                               f"{', '.join(sorted(FAMILIES))}.")
        config = AutoConfig.from_pretrained(path)
        reader = SafetensorsReader(path)
        family = FAMILIES[model_type]
        if config.model_type in WRAPPERS:  # a vision-language checkpoint: its language model
            family, config, reader = WRAPPERS[config.model_type].language_model(config, reader)
        blocks = fp8_blocks(config)
        return cls(Path(path), family, config, reader, blocks, scale_pairs(blocks, reader.tensors, path))

    def hf_moe_config(self, **overrides: Any) -> HfMoeConfig:
        return to_hf_moe_config(self.family, self.config, **overrides)

    def plans(self, expected: dict[str, tuple[int, ...]], config: HfMoeConfig) -> list[TensorPlan]:
        """The checked plan of every tensor in `expected` (the hf-moe model's names and full shapes)."""
        have = {name: info.shape for name, info in self.reader.tensors.items() if name not in self.scales.values()}
        fused = {name for name in have if name.endswith((".gate_up_proj", ".down_proj"))}
        family = self.family
        if any(f".{family.fused_moe_module}.{family.experts}." in name for name in fused):
            family = replace(family, moe_module=family.fused_moe_module)  # a state dict saved as transformers holds it
        plans = tensor_plans(family, expected, config.moe_layer_indices, have)
        ignored = (lambda name: self.family.ignored(self.config, name)) if self.family.ignored else (lambda name: False)
        check_against(plans, self.family, have, str(self.path), config.tie_word_embeddings, ignored)
        wanted = {name for plan in plans for name in plan.foreign_names}
        odd = sorted({str(self.reader.tensors[n].dtype) for n in wanted - set(self.scales)}
                     - {str(d) for d in FLOAT_DTYPES})
        if odd:
            raise InteropError(f"{self.path}: tensors of dtype {odd}; hf-moe imports float checkpoints and FP8 ones "
                               "whose config.json declares quantization_config quant_method 'fp8' (block scales in "
                               "`*_scale_inv` tensors) only.")
        return plans

    def dtype(self, plan: TensorPlan) -> torch.dtype:
        """The dtype `plan`'s tensor has in the checkpoint: as stored, or the compute dtype of an FP8 one."""
        name = plan.foreign_names[0]
        return compute_dtype(self.config) if name in self.scales else self.reader.tensors[name].dtype

    def read(self, plan: TensorPlan, start: int | None = None, end: int | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """The hf-moe tensor of `plan` in `dtype` (default: as stored, float32 for FP8 tensors); for expert tensors
        only experts `[start, end)` when given. FP8 tensors are dequantized here, one tensor or one expert at a time,
        each cast to `dtype` before the next is read, so the float32 values of more than one are never held."""
        name = plan.sources[0][0]
        if not plan.experts:
            value = self._get(name)
            value = (value if plan.rows is None else value[plan.rows[0] : plan.rows[1]]).reshape(plan.shape)
            return value if dtype is None else value.to(dtype)
        if not plan.per_expert and name not in self.scales:
            value = self._get(name, start, end)
            return value if dtype is None else value.to(dtype)
        experts = range(plan.shape[0])[slice(start, end)]
        stored = torch.float32 if name in self.scales else self.reader.tensors[name].dtype
        out = torch.empty((len(experts), *plan.shape[1:]), dtype=dtype or stored)
        for i, e in enumerate(experts):
            if plan.per_expert:
                out[i] = torch.cat(self._get_many(list(plan.sources[e])))
            else:
                out[i] = self._get(name, e, e + 1)[0]
        return out

    def _get(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        if name not in self.scales:
            return self.reader.get(name, start, end)
        return read_dequantized(self.reader, name, self.scales[name], self.blocks.block, start, end)

    def _get_many(self, names: list[str]) -> list[torch.Tensor]:
        if not any(name in self.scales for name in names):
            return self.reader.get_many(names)
        return [self._get(name) for name in names]
