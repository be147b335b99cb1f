"""Loading a checkpoint straight into an expert-parallel model, and saving one standard checkpoint from it."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from peft import get_peft_model_state_dict
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..checkpoint_files import tensor_files
from ..configuration_hf_moe import HfMoeConfig
from ..interop import FAMILIES, ForeignCheckpoint, checkpoint_model_type
from ..interop.load import load_checkpoint
from ..moe.block import expert_modules
from .collectives import gather_experts
from .groups import ExpertParallelGroups, init_expert_parallel
from .sharding import expert_parallel_groups, expert_parallelize, expert_parameter_names

# What `from_pretrained(..., expert_parallel_size=P)` does with transformers' keyword arguments: passed on, accepted
# because they change nothing for a local folder, or refused because they would change what is read.
_LOAD_KWARGS = {"config", "dtype", "device", "global_aux_loss", "padded_dispatch", "subfolder"}
_NO_EFFECT_KWARGS = {"_from_auto", "_commit_hash", "adapter_kwargs", "trust_remote_code", "local_files_only"}
_HUB_KWARGS = {"revision": (None, "main"), "cache_dir": (None,), "token": (None,), "force_download": (False,),
               "proxies": (None,)}


def from_pretrained_expert_parallel(
    model_class: type, path: str, expert_parallel_size: int, model_args: tuple, kwargs: dict
) -> nn.Module:
    """`model_class.from_pretrained(path, *model_args, expert_parallel_size=P, **kwargs)`: the keyword arguments
    transformers' `from_pretrained` takes are passed on where they apply (`config`, config fields, `subfolder`,
    `dtype`, `device`), accepted where they change nothing for a local folder, and refused by name otherwise."""
    if model_args:
        raise ValueError(f"from_pretrained(expert_parallel_size=...) takes no positional model arguments; got "
                         f"{model_args}.")
    for name, defaults in _HUB_KWARGS.items():
        if kwargs.get(name, defaults[0]) not in defaults:
            raise ValueError(f"from_pretrained(expert_parallel_size=...) reads a local folder, so {name}="
                             f"{kwargs[name]!r} cannot apply; download the checkpoint first (e.g. "
                             f"huggingface_hub.snapshot_download(repo, {name}=...)) and pass the folder.")
    known = _LOAD_KWARGS | _NO_EFFECT_KWARGS | set(_HUB_KWARGS)
    config_fields = {k: v for k, v in kwargs.items() if k not in known and k in HfMoeConfig().to_dict()}
    unsupported = sorted(set(kwargs) - known - set(config_fields))
    if unsupported:
        raise ValueError(f"from_pretrained(expert_parallel_size=...) does not support {unsupported}; it takes "
                         f"{sorted(_LOAD_KWARGS)} and config fields (e.g. router_aux_loss_coef=...).")
    if kwargs.get("subfolder"):
        path = os.path.join(path, kwargs["subfolder"])
    return load_expert_parallel(model_class, path, expert_parallel_size, dtype=kwargs.get("dtype"),
                                device=kwargs.get("device"), global_aux_loss=kwargs.get("global_aux_loss", True),
                                padded_dispatch=kwargs.get("padded_dispatch", False), config=kwargs.get("config"),
                                **config_fields)


def load_expert_parallel(
    model_class: type,
    path: str,
    expert_parallel_size: int,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    global_aux_loss: bool = True,
    padded_dispatch: bool = False,
    config: HfMoeConfig | None = None,
    **config_kwargs,
) -> nn.Module:
    """Build `model_class` from the checkpoint in `path` with its experts sharded over `expert_parallel_size` ranks.

    Each rank reads only its own slice of each expert tensor (`safe_open(...).get_slice`); the full expert stack is
    never materialised. Non-expert weights are read whole (they are replicated). Collective: call on every rank.
    `global_aux_loss` and `padded_dispatch` are passed on to `expert_parallelize`. `config` replaces the checkpoint's
    config; `config_kwargs` override its fields. A checkpoint of a foreign family (`hf_moe.interop.FAMILIES`) is read
    through the family's plan: its config mapped, each rank's experts read from per-expert or fused tensors. Every
    tensor's full shape is checked against the config, and a checkpoint with missing or unexpected tensors is refused
    (naming them) before anything is read.
    """
    if not os.path.isdir(path):
        raise ValueError(f"expert-parallel loading reads a local checkpoint folder; {path!r} is not one (download it "
                         "first, e.g. with huggingface_hub.snapshot_download).")
    foreign = checkpoint_model_type(path) in FAMILIES
    if foreign and config is not None:
        raise ValueError(f"{path} is a {checkpoint_model_type(path)} checkpoint: its config.json decides the model, "
                         "so config= cannot apply; override single fields as keyword arguments.")
    if foreign:
        checkpoint = ForeignCheckpoint.open(path)
        config = checkpoint.hf_moe_config(**config_kwargs)
    elif config is None:
        config = HfMoeConfig.from_pretrained(path, **config_kwargs)
    else:
        config = HfMoeConfig.from_dict({**config.to_dict(), **config_kwargs})  # validated like any config
    groups = init_expert_parallel(expert_parallel_size, config.num_experts)
    if device is None:
        from accelerate import PartialState

        device = PartialState().device  # this process's GPU under a launcher (LOCAL_RANK), else the CPU
    if isinstance(dtype, str):
        dtype = config.dtype if dtype == "auto" else getattr(torch, dtype)
    dtype = dtype or torch.float32
    if foreign:  # the family's plan reads each rank's expert rows from per-expert or fused tensors
        model = load_checkpoint(model_class, checkpoint, config, device, dtype, groups.expert_range(config.num_experts))
        return expert_parallelize(model, groups, global_aux_loss, padded_dispatch=padded_dispatch)
    with torch.device("meta"):
        model = model_class(config)
    start, end = groups.expert_range(config.num_experts)
    for experts in expert_modules(model).values():
        experts.keep(start, end)
    model = model.to_empty(device=device).to(dtype)
    files = tensor_files(path)
    expert_names = set(expert_parameter_names(model))
    state = model.state_dict()
    missing = [n for n in state if n not in files and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}.")
    unexpected = sorted(set(files) - set(state))
    if unexpected:
        raise ValueError(f"{path}: checkpoint has {len(unexpected)} tensors this {config.model_type} model does not, "
                         f"e.g. {unexpected[:3]}: it is not a checkpoint of this architecture and config.")
    _check_shapes(path, files, state, expert_names, config)
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in files:
                continue
            with safe_open(files[name], framework="pt") as f:
                value = f.get_slice(name)[start:end] if name in expert_names else f.get_tensor(name)
            tensor.copy_(value.to(dtype))
    for module in model.modules():  # non-persistent buffers (RoPE inverse frequencies) are not in checkpoints
        if isinstance(module, LlamaRotaryEmbedding):
            fresh = type(module)(config=config).to(device)
            module.inv_freq, module.original_inv_freq = fresh.inv_freq, fresh.original_inv_freq
    if config.tie_word_embeddings:
        model.tie_weights()
    return expert_parallelize(model.eval(), groups, global_aux_loss, padded_dispatch=padded_dispatch)


def _check_shapes(path: str, files: dict[str, str], state: dict[str, torch.Tensor], expert_names: set[str],
                  config: HfMoeConfig) -> None:
    """Every tensor's shape in the checkpoint must equal the full (unsharded) model's: expert tensors hold all
    `config.num_experts` experts, whatever this rank keeps of them."""
    for name, tensor in state.items():
        if name not in files:
            continue
        expected = [config.num_experts, *tensor.shape[1:]] if name in expert_names else list(tensor.shape)
        with safe_open(files[name], framework="pt") as f:
            shape = list(f.get_slice(name).get_shape())
        if shape != expected:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {shape}; the config (num_experts={config.num_experts}, "
                f"hidden_size={config.hidden_size}, moe_intermediate_size={config.moe_intermediate_size}) expects "
                f"{expected}."
            )


def gather_state_dict(model: nn.Module, groups: ExpertParallelGroups) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on global rank 0, `None` elsewhere. Collective within the first EP group.

    Experts are gathered one tensor at a time and only rank 0 keeps them (on the CPU), so the other ranks never hold
    more than one layer's full expert stack.
    """
    state = model.state_dict()
    if groups.edp_rank != 0:
        return None
    keep = dist.get_rank() == 0
    expert_names = set(expert_parameter_names(model))
    full = {}
    for name, tensor in state.items():
        if name in expert_names and groups.ep_size > 1:
            tensor = gather_experts(tensor, groups.ep_group)
        if keep:
            full[name] = tensor.detach().cpu()
    return full if keep else None


def save_expert_parallel(model: nn.Module, path: str, **save_kwargs) -> None:
    """Write one standard checkpoint (all experts) that a single process loads; collective, rank 0 writes. Works
    under DDP and under FSDP (`fully_shard_moe`), where the full state dict is gathered to rank 0's CPU."""
    if isinstance(model, FSDPModule):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        state = state if dist.get_rank() == 0 else None
    else:
        state = gather_state_dict(model, expert_parallel_groups(model))
    if state is not None:
        model.save_pretrained(path, state_dict=state, **save_kwargs)
    dist.barrier()


def save_adapter_expert_parallel(model: nn.Module, path: str) -> None:
    """Save a LoRA adapter trained under expert parallelism as one adapter a single process loads.

    PEFT keeps one low-rank pair per expert: `lora_A [r·E, in]` expert-major and `lora_B [out, r·E]` with the
    expert index varying fastest. Each rank holds its E/P experts' pairs; they are gathered over the first
    expert-parallel group and rank 0 writes. Under FSDP (`fully_shard_moe`) each adapter weight is first gathered
    from its FSDP shards. Collective: call on every rank.
    """
    groups = expert_parallel_groups(model)
    experts = {f"{name}.": module for name, module in expert_modules(model).items()}
    adapter = get_peft_model_state_dict(model)
    if isinstance(model, FSDPModule):  # FSDP shards (experts': over the expert-data-parallel group) made whole
        adapter = {name: tensor.full_tensor() for name, tensor in adapter.items()}
    full = {}
    for name, tensor in adapter.items():
        owner = next((module for prefix, module in experts.items() if name.startswith(prefix)), None)
        if groups is not None and groups.ep_size > 1 and groups.edp_rank == 0 and owner is not None:
            if "lora_B" in name:  # [out, r·E/P] with the expert fastest → [out, r, E/P], gathered along the experts
                local = tensor.reshape(tensor.shape[0], -1, owner.num_experts)
                tensor = gather_experts(local, groups.ep_group, dim=2).reshape(tensor.shape[0], -1)
            else:
                tensor = gather_experts(tensor, groups.ep_group)
        full[name] = tensor.detach().cpu()
    if groups is None or dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        model.save_pretrained(path, state_dict=full)
    if groups is not None:
        dist.barrier()
