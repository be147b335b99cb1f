"""Loading a checkpoint straight into an expert-parallel model, and saving one standard checkpoint from it."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from ..checkpoint_files import tensor_files
from ..configuration_hf_moe import HfMoeConfig
from .groups import ExpertParallelGroups, init_expert_parallel
from .sharding import expert_parallel_groups, expert_parallelize, is_expert_parameter


def load_expert_parallel(
    model_class: type,
    path: str,
    expert_parallel_size: int,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    global_aux_loss: bool = True,
    padded_dispatch: bool = False,
    **config_kwargs,
) -> nn.Module:
    """Build `model_class` from the checkpoint in `path` with its experts sharded over `expert_parallel_size` ranks.

    Each rank reads only its own slice of each expert tensor (`safe_open(...).get_slice`); the full expert stack is
    never materialised. Non-expert weights are read whole (they are replicated). Collective: call on every rank.
    `global_aux_loss` and `padded_dispatch` are passed on to `expert_parallelize`.
    """
    if not os.path.isdir(path):
        raise ValueError(f"expert-parallel loading reads a local checkpoint folder; {path!r} is not one (download it "
                         "first, e.g. with huggingface_hub.snapshot_download).")
    config = HfMoeConfig.from_pretrained(path, **config_kwargs)
    groups = init_expert_parallel(expert_parallel_size, config.num_experts)
    if device is None:
        from accelerate import PartialState

        device = PartialState().device  # this process's GPU under a launcher (LOCAL_RANK), else the CPU
    if isinstance(dtype, str):
        dtype = config.dtype if dtype == "auto" else getattr(torch, dtype)
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = model_class(config)
    start, end = groups.expert_range(config.num_experts)
    for block_name, module in model.named_modules():
        if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and block_name.endswith("experts"):
            module.gate_up_proj = nn.Parameter(module.gate_up_proj[start:end])
            module.down_proj = nn.Parameter(module.down_proj[start:end])
            module.num_experts = end - start
    model = model.to_empty(device=device).to(dtype)
    files = tensor_files(path)
    state = model.state_dict()
    missing = [n for n in state if n not in files and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}.")
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in files:
                continue
            with safe_open(files[name], framework="pt") as f:
                value = f.get_slice(name)[start:end] if is_expert_parameter(name) else f.get_tensor(name)
            tensor.copy_(value.to(dtype))
    for module in model.modules():  # non-persistent buffers (RoPE inverse frequencies) are not in checkpoints
        if "RotaryEmbedding" in type(module).__name__:
            fresh = type(module)(config=config).to(device)
            module.inv_freq, module.original_inv_freq = fresh.inv_freq, fresh.original_inv_freq
    if config.tie_word_embeddings:
        model.tie_weights()
    return expert_parallelize(model.eval(), groups, global_aux_loss, padded_dispatch=padded_dispatch)


def gather_state_dict(model: nn.Module, groups: ExpertParallelGroups) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict on global rank 0, `None` elsewhere. Collective within the first EP group.

    Experts are gathered one tensor at a time and only rank 0 keeps them (on the CPU), so the other ranks never hold
    more than one layer's full expert stack.
    """
    state = model.state_dict()
    if groups.edp_rank != 0:
        return None
    keep = dist.get_rank() == 0
    full = {}
    for name, tensor in state.items():
        if is_expert_parameter(name) and groups.ep_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(groups.ep_size)]
            dist.all_gather(parts, tensor.contiguous(), group=groups.ep_group)
            tensor = torch.cat(parts) if keep else None
        if keep:
            full[name] = tensor.detach().cpu()
    return full if keep else None


def save_expert_parallel(model: nn.Module, path: str, **save_kwargs) -> None:
    """Write one standard checkpoint (all experts) that a single process loads; collective, rank 0 writes."""
    groups = expert_parallel_groups(model)
    state = gather_state_dict(model, groups)
    if state is not None:
        model.save_pretrained(path, state_dict=state, **save_kwargs)
    dist.barrier()
