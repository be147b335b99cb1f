"""PEFT helpers: a `LoraConfig` that knows where an hf-moe model keeps its weights."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model_state_dict
from torch import nn


def lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    attention: bool = True,
    experts: bool = True,
    router: bool = False,
    dense_mlp: bool = True,
    shared_experts: bool = True,
    **kwargs,
) -> LoraConfig:
    """Build a `LoraConfig` for an hf-moe model.

    Args:
        r, lora_alpha: LoRA rank and scaling numerator.
        attention: adapt `q_proj`, `k_proj`, `v_proj`, `o_proj`.
        experts: adapt the routed experts' 3D weights (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`)
            through PEFT's `target_parameters`, one low-rank update per expert; works when the experts are
            sharded by expert parallelism, since each rank holds its experts as plain parameters.
        router: adapt the router weight (`mlp.router.weight`) as well.
        dense_mlp: adapt the MLPs of dense (non-MoE) layers.
        shared_experts: adapt the shared experts' projections.
        **kwargs: passed to `LoraConfig` (e.g. `lora_dropout`, `init_lora_weights`).
    """
    modules: list[str] = []
    if attention:
        modules += ["q_proj", "k_proj", "v_proj", "o_proj"]
    if dense_mlp:
        modules += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if shared_experts:
        modules += ["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]
    parameters: list[str] = []
    if experts:
        parameters += ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    if router:
        parameters.append("mlp.router.weight")
    if not modules and not parameters:
        raise ValueError("lora_config: nothing to adapt; set at least one of attention, experts, router, "
                         "dense_mlp, shared_experts to True.")
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=modules or None,
        target_parameters=parameters or None,
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        **kwargs,
    )


def save_adapter_expert_parallel(model: nn.Module, path: str) -> None:
    """Save a LoRA adapter trained under expert parallelism as one adapter a single process loads.

    PEFT keeps one low-rank pair per expert: `lora_A [r·E, in]` expert-major and `lora_B [out, r·E]` with the
    expert index varying fastest. Each rank holds its E/P experts' pairs; they are gathered over the first
    expert-parallel group and rank 0 writes. Collective: call on every rank.
    """
    from ..parallel import expert_parallel_groups, is_expert_parameter

    groups = expert_parallel_groups(model)
    state = get_peft_model_state_dict(model)
    full = {}
    for name, tensor in state.items():
        if groups is not None and groups.ep_size > 1 and groups.edp_rank == 0 and is_expert_parameter(name):
            parts = [torch.empty_like(tensor) for _ in range(groups.ep_size)]
            dist.all_gather(parts, tensor.contiguous(), group=groups.ep_group)
            if "lora_B" in name:
                local_experts = model.get_submodule(_module_of(name)).num_experts
                parts = [p.reshape(p.shape[0], -1, local_experts) for p in parts]
                tensor = torch.cat(parts, dim=2).reshape(tensor.shape[0], -1)
            else:
                tensor = torch.cat(parts, dim=0)
        full[name] = tensor.detach().cpu()
    if groups is None or dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        model.save_pretrained(path, state_dict=full)
    if groups is not None:
        dist.barrier()


def _module_of(state_name: str) -> str:
    """`base_model.model.x.experts.lora_B.weight` → the LoRA wrapper `base_model.model.x.experts`."""
    return state_name.split(".lora_B")[0]
