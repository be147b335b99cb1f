"""Which foreign family can express an hf-moe model exactly, and the config an export writes for it."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..configuration_hf_moe import HfMoeConfig
from .checkpoint import to_hf_moe_config
from .family import FAMILIES, InteropError, differences


def export_config(config: HfMoeConfig, model_type: str) -> PretrainedConfig:
    """The config of family `model_type` that computes what `config` computes, with `architectures` set; raises
    [`InteropError`] naming the first field the family cannot express and the families that could take it."""
    try:
        return _export_config(config, model_type)
    except InteropError as err:
        others = [name for name in families_for(config) if name != model_type] + ["hf_moe"]
        raise InteropError(f"{err} Families that express this model exactly: {', '.join(others)}.") from None


def _export_config(config: HfMoeConfig, model_type: str) -> PretrainedConfig:
    if model_type not in FAMILIES:
        raise InteropError(f"to={model_type!r} is not a family hf-moe exports; expected one of "
                           f"{', '.join(sorted(FAMILIES))} or 'hf_moe'.")
    family = FAMILIES[model_type]
    if config.router_type != "topk":
        raise InteropError(f"{model_type}: router_type={config.router_type!r} cannot be expressed exactly: "
                           "expert-choice, hash, switch and fake-balanced routers exist in hf-moe only.")
    if config.drop_tokens:
        raise InteropError(f"{model_type}: drop_tokens=True cannot be expressed exactly: "
                           "no family's class drops tokens over an expert capacity.")
    if not config.moe_layer_indices:
        raise InteropError(f"{model_type}: moe_layers=[] cannot be expressed exactly: a model without MoE layers is "
                           "dense (save it as a dense model instead).")
    try:
        foreign = family.foreign_config(**family.from_hf_moe(config))
    except (TypeError, ValueError) as err:
        if isinstance(err, InteropError):
            raise
        raise InteropError(f"{model_type}: transformers' config class refuses the mapped config: {err}") from err
    back = to_hf_moe_config(family, foreign)
    changed = differences(config, back)
    if changed:
        field, (ours, theirs) = next(iter(changed.items()))
        raise InteropError(f"{model_type}: {field}={ours!r} cannot be expressed exactly: the {model_type} config "
                           f"reads back as {field}={theirs!r}.")
    foreign.architectures = [family.architecture]
    foreign.dtype = config.dtype
    return foreign


def families_for(config: HfMoeConfig) -> list[str]:
    """The families (in registration order) whose export of `config` computes exactly what it computes."""
    found = []
    for name in FAMILIES:
        try:
            _export_config(config, name)
        except InteropError:
            continue
        found.append(name)
    return found
