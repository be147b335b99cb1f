"""Building an hf-moe model straight from a foreign checkpoint: the model is made on the meta device, given storage
(only this rank's experts under expert parallelism) and filled tensor by tensor through the family's plan, so no
second copy of the weights is ever held."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from ..attention import HfMoeRotaryEmbedding
from ..configuration_hf_moe import HfMoeConfig
from ..moe.block import expert_modules
from .checkpoint import ForeignCheckpoint
from .family import InteropError
from .plan import TensorPlan

# `from_pretrained` keywords a foreign load takes, and those it accepts because they change nothing for a local folder.
_LOAD_KWARGS = {"dtype", "torch_dtype", "device", "device_map", "attn_implementation", "experts_implementation",
                "output_loading_info", "subfolder"}
_NO_EFFECT_KWARGS = {"_from_auto", "_commit_hash", "adapter_kwargs", "trust_remote_code", "local_files_only",
                     "revision"}


def resolve_dtype(dtype: torch.dtype | str | None, config: HfMoeConfig) -> torch.dtype:
    """`None`/"auto" → the checkpoint's dtype (transformers 5's default), a name → that torch dtype."""
    if dtype is None or dtype == "auto":
        dtype = config.dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def materialize(model_class: type, config: HfMoeConfig, device: torch.device | str, dtype: torch.dtype,
                expert_range: tuple[int, int] | None = None) -> nn.Module:
    """`model_class(config)` with uninitialised storage on `device` in `dtype`, keeping only experts
    `[start, end)` of every MoE layer when `expert_range` is given; fill it with [`fill`]. Built with `dtype` as
    torch's default, as transformers does, so buffers made in float32 on purpose (the expert bias) stay float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    if expert_range is not None:
        for experts in expert_modules(model).values():
            experts.keep(*expert_range)
    return model.to_empty(device=device)


def fill(model: nn.Module, config: HfMoeConfig, read: Callable[[str], torch.Tensor | None]) -> nn.Module:
    """Copy `read(name)` into every tensor of the state dict (`None`: the checkpoint has none, e.g. a tied head),
    recompute the RoPE buffers checkpoints do not hold, tie the head and switch to evaluation mode."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            value = read(name)
            if value is not None:
                tensor.copy_(value.to(tensor.dtype))
    for module in model.modules():
        if isinstance(module, HfMoeRotaryEmbedding):
            fresh = type(module)(config=config).to(module.inv_freq.device)
            module.inv_freq.copy_(fresh.inv_freq)
            module.original_inv_freq.copy_(fresh.original_inv_freq)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def expected_shapes(model: nn.Module, config: HfMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name an hf-moe checkpoint of `model` holds, with its full (all-experts) shape."""
    experts = {f"{name}.{p}" for name in expert_modules(model) for p in ("gate_up_proj", "down_proj")}
    shapes = {n: (config.num_experts, *t.shape[1:]) if n in experts else tuple(t.shape)
              for n, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def load_checkpoint(model_class: type, checkpoint: ForeignCheckpoint, config: HfMoeConfig,
                    device: torch.device | str, dtype: torch.dtype,
                    expert_range: tuple[int, int] | None = None) -> nn.Module:
    """The hf-moe model of a foreign checkpoint (experts `[start, end)` only when `expert_range` is given). Every
    tensor is checked against the plan before any is read."""
    model = materialize(model_class, config, device, dtype, expert_range)
    plans: dict[str, TensorPlan] = {p.name: p for p in checkpoint.plans(expected_shapes(model, config), config)}
    start, end = expert_range or (None, None)
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}

    def read(name: str) -> torch.Tensor | None:
        plan = plans.get(name)
        return None if plan is None else checkpoint.read(plan, start, end, dtypes[name])

    return fill(model, config, read)


def load_foreign_pretrained(model_class: type, path: str | os.PathLike, kwargs: dict[str, Any]) -> Any:
    """`model_class.from_pretrained(path, **kwargs)` for a foreign checkpoint folder: the model computes exactly what
    the family's transformers class computes, or an [`InteropError`] names what it could not express."""
    if "config" in kwargs:
        raise InteropError(f"{path} is a foreign checkpoint: its config.json decides the model, so config= cannot "
                           "apply; override single fields as keyword arguments (e.g. router_aux_loss_coef=0.01).")
    known = _LOAD_KWARGS | _NO_EFFECT_KWARGS
    fields = {k: v for k, v in kwargs.items() if k not in known and k in HfMoeConfig().to_dict()}
    unsupported = sorted(set(kwargs) - known - set(fields))
    if unsupported:
        raise InteropError(f"from_pretrained of a foreign checkpoint does not support {unsupported}; it takes "
                           f"{sorted(_LOAD_KWARGS)} and HfMoeConfig fields.")
    if kwargs.get("subfolder"):
        path = os.path.join(path, kwargs["subfolder"])
    checkpoint = ForeignCheckpoint.open(path)
    config = checkpoint.hf_moe_config(**fields)
    device = kwargs.get("device", kwargs.get("device_map")) or "cpu"
    if not isinstance(device, (str, torch.device)) or device == "auto":
        raise InteropError(f"device_map={device!r}: a foreign checkpoint loads onto one device (e.g. 'cuda:0').")
    model = load_checkpoint(model_class, checkpoint, config, device,
                            resolve_dtype(kwargs.get("dtype", kwargs.get("torch_dtype")), config))
    if kwargs.get("attn_implementation"):
        model.set_attn_implementation(kwargs["attn_implementation"])
    if kwargs.get("experts_implementation"):
        model.set_experts_implementation(kwargs["experts_implementation"])
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    if kwargs.get("output_loading_info"):
        info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model, info
    return model
