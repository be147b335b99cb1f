"""Expert parallelism composed with FSDP2 (`fully_shard`), the way accelerate drives it.

W ranks = P × D. Non-expert weights (attention, norms, routers, shared experts, embeddings, head) are sharded over
all W ranks: one FSDP group per decoder layer and one for the rest (the root). Each rank's E/P experts are sharded
over its expert-data-parallel group (the D ranks holding the same experts), one FSDP group per MoE layer, on the
`edp` dimension of a 2-D `(edp, ep)` device mesh. The experts are sharded before `accelerator.prepare`, which
shards the rest as for any model and leaves already-sharded modules alone (docs/decisions/fsdp2.md).

Gradient maths is unchanged from expert parallelism over DDP: every gradient is ∇ of the mean of the W ranks'
losses. FSDP averages the non-expert gradients over W ranks. An expert's gradient on its owner already sums the P
ranks of its EP group; FSDP averages it over the D replicas, and `finish_gradients` divides it by P. (FSDP's own
gradient divide factor is not used: with one rank per group, D = 1, torch 2.13 applies it twice.)

Checkpoints see every expert weight, and its optimizer state, as one tensor of all E experts: a DTensor over the
`(edp, ep)` mesh, sharded first over the EP ranks and then over the expert-data-parallel ranks. So torch's
distributed checkpoint (accelerate's `save_state` / `load_state`) resumes at another W or P, and a full state dict
(`accelerator.get_state_dict`) holds every expert.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard  # FSDP2's own placement for an inner split

from ..moe.block import moe_blocks
from ..moe.experts import base_layer
from .all_to_all import AllToAllDispatcher
from .groups import ExpertParallelGroups
from .sharding import expert_parallel_groups


def fully_shard_moe(
    model: nn.Module,
    accelerator=None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard `model` with FSDP2: experts over their expert-data-parallel group, everything else over all ranks.

    Call on every rank after loading (`from_pretrained(..., expert_parallel_size=P)`) and any PEFT wrapping.

    - With an `accelerator` built with `FullyShardedDataParallelPlugin(fsdp_version=2)`: call before
      `accelerator.prepare`. This shards the experts with the plugin's mixed-precision policy, CPU offload and
      `reshard_after_forward`; `prepare` then shards the rest as it does for any model (its wrap policy, activation
      checkpointing, mixed precision), leaving the already-sharded experts alone.
    - Without one: shards the experts, each decoder layer and the root itself, with the keyword arguments' policies.

    With mixed precision, trainable weights are kept in float32 (master weights) and cast for compute. An
    `optimizer` built on the unsharded model is switched to the sharded expert weights (by name) and its expert
    state checkpoints as all E experts (`checkpoint_optimizer_as_all_experts`). Returns the model.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fully_shard_moe needs a distributed launch (accelerate launch, or torchrun); this process "
                           "has no process group.")
    if accelerator is not None:
        if not getattr(accelerator, "is_fsdp2", False):
            raise ValueError("fully_shard_moe(model, accelerator): the accelerator does not use FSDP2; create it with "
                             "Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2)) or an "
                             "accelerate config with fsdp_version: 2.")
        plugin = accelerator.state.fsdp_plugin
        if plugin.cpu_ram_efficient_loading:
            raise ValueError("fully_shard_moe: cpu_ram_efficient_loading=True would broadcast rank 0's experts to "
                             "every rank; expert-parallel loading already reads only each rank's experts. Set "
                             "fsdp_cpu_ram_efficient_loading: false.")
        mp_policy = mp_policy or plugin.mixed_precision_policy
        offload_policy = offload_policy or plugin.cpu_offload
        reshard_after_forward = plugin.reshard_after_forward
    if isinstance(model, FSDPModule):
        raise ValueError("fully_shard_moe: the model is already sharded by FSDP.")
    mp_policy = mp_policy or MixedPrecisionPolicy()
    names = {id(p): n for n, p in model.named_parameters()}
    if mp_policy.param_dtype is not None:
        _float32_master_weights(model)
    kwargs = {"mp_policy": mp_policy, "offload_policy": offload_policy or OffloadPolicy(),
              "reshard_after_forward": reshard_after_forward}
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    groups = expert_parallel_groups(model)
    if groups is not None:
        _shard_experts(model, groups, _expert_mesh(groups, device_type), kwargs)
    if accelerator is None:
        world = init_device_mesh(device_type, (dist.get_world_size(),))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=world, **kwargs)
        fully_shard(model, mesh=world, **{**kwargs, "reshard_after_forward": False})
    if optimizer is not None:
        _switch_optimizer(optimizer, names, dict(model.named_parameters()))
        checkpoint_optimizer_as_all_experts(model, optimizer)
    return model


def _shard_experts(model: nn.Module, groups: ExpertParallelGroups, mesh: DeviceMesh, kwargs: dict) -> None:
    """One FSDP group per MoE layer's experts over the expert-data-parallel group."""
    for block in moe_blocks(model):
        dispatcher = block.dispatcher
        if not isinstance(dispatcher, AllToAllDispatcher):
            raise ValueError(f"fully_shard_moe: an MoE block dispatches with {type(dispatcher).__name__}; expected "
                             "the AllToAllDispatcher that expert_parallelize installs.")
        if dispatcher.weight_grads is not None:
            raise ValueError("fully_shard_moe cannot shard experts loaded with overlap_weight_grads=True: they "
                             "accumulate weight gradients outside autograd, after FSDP reduce-scatters them.")
        fully_shard(block.experts, mesh=mesh["edp"], **kwargs)
        # a sum then a division by D (gloo has no average); `finish_gradients` then divides by P
        block.experts.set_force_sum_reduction_for_comms(True)
        _checkpoint_as_all_experts(block.experts, mesh, block.router.num_experts)
        block.set_dispatcher(AllToAllDispatcher(dispatcher.group, dispatcher.num_experts, padded=dispatcher.padded,
                                                sharded_experts=True))


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules transformers would not split across devices (`_no_split_modules`: the decoder layers)."""
    classes = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in classes]


@functools.cache
def _expert_mesh(groups: ExpertParallelGroups, device_type: str) -> DeviceMesh:
    """The `(edp, ep)` device mesh of the W = P × D layout: `mesh[edp_rank, ep_rank]` is global rank
    `edp_rank·P + ep_rank`, in row-major order (torch 2.11's DTensor refuses to gather over mesh dimensions whose
    ranks are not). Collective on first use."""
    ranks = torch.arange(groups.world_size).view(groups.edp_size, groups.ep_size)
    return DeviceMesh(device_type, ranks, mesh_dim_names=("edp", "ep"))


def _float32_master_weights(model: nn.Module) -> None:
    """FSDP's mixed precision casts the sharded weights for compute; the sharded weights are what the optimizer
    updates, so trainable ones are kept in float32."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def _all_experts_view(local: DTensor, mesh: DeviceMesh, num_experts: int) -> DTensor:
    """`local` (this rank's experts, sharded over its expert-data-parallel group) seen as the tensor of all experts,
    sharing its storage. Each EP rank holds E/P consecutive experts (the outer split of dim 0, mesh dim `ep`), which
    FSDP splits over the expert-data-parallel group (the inner split, mesh dim `edp`, which comes first in the mesh):
    torch writes that inner split as `_StridedShard(0, split_factor=P)`, as FSDP2 does for tensor-parallel weights."""
    shape = (num_experts, *local.shape[1:])
    placements = [_StridedShard(0, split_factor=mesh.size(1)), Shard(0)]
    return DTensor.from_local(local.to_local(), mesh, placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _local_experts_view(value: DTensor, like: DTensor) -> DTensor:
    """The inverse of `_all_experts_view`: `value`'s local shard on the mesh and placements of `like`."""
    return DTensor.from_local(value.to_local(), like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def _expert_weights(experts: nn.Module) -> dict[str, nn.Parameter]:
    """The expert-major weights of an experts module (not adapters on them), by name relative to it."""
    base = base_layer(experts)
    prefix = next(n for n, m in experts.named_modules() if m is base)
    return {f"{prefix}.{n}" if prefix else n: p for n, p in base.named_parameters(recurse=False)}


def _checkpoint_as_all_experts(experts: nn.Module, mesh: DeviceMesh, num_experts: int) -> None:
    """State-dict hooks: `experts.state_dict()` holds the all-experts view of each expert weight, and
    `load_state_dict` takes that view back."""
    names = list(_expert_weights(experts))

    def to_global(module, state_dict, prefix, local_metadata) -> None:
        for name in names:
            value = state_dict.get(prefix + name)
            if isinstance(value, DTensor) and value.device_mesh is not mesh:
                state_dict[prefix + name] = _all_experts_view(value, mesh, num_experts)

    def to_local(module, state_dict, prefix, *args) -> None:
        params = _expert_weights(module)
        for name in names:
            value = state_dict.get(prefix + name)
            if isinstance(value, DTensor) and value.device_mesh is mesh:
                state_dict[prefix + name] = _local_experts_view(value, params[name])

    experts.register_state_dict_post_hook(to_global)
    experts.register_load_state_dict_pre_hook(to_local)


def local_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The whole rows (slices along dim 0) of `tensor` this process holds, sharing its storage: a DTensor's local
    shard when it is sharded along dim 0 (FSDP2's layout) or replicated; any other tensor itself."""
    if not isinstance(tensor, DTensor):
        return tensor
    if not all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in tensor.placements):
        raise ValueError(f"whole rows on each process need a DTensor sharded along dim 0 or replicated; got "
                         f"placements {tensor.placements}")
    return tensor.to_local()


def checkpoint_optimizer_as_all_experts(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state-dict hooks: the state of each expert weight is saved as all E experts (as the weight itself
    is by `fully_shard_moe`) and loaded back from that view, so distributed checkpoints resume at another W or P.
    `fully_shard_moe(model, accelerator, optimizer)` and `MoETrainerCallback` call it; call it yourself for an
    optimizer built after sharding. Calling it again for the same optimizer changes nothing."""
    groups = expert_parallel_groups(model)
    if groups is None or not any(isinstance(p, DTensor) for p in model.parameters()):
        return  # not sharded by FSDP: optimizer state is plain tensors of this rank's experts
    mesh = _expert_mesh(groups, "cuda" if dist.get_backend() == "nccl" else "cpu")
    experts = {id(p): block.router.num_experts for block in moe_blocks(model)
               for p in _expert_weights(block.experts).values()}
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one

    def expert_states(state_dict: dict) -> list[tuple[dict, nn.Parameter, int]]:
        """(state, parameter, E) of every expert weight in `state_dict`, matched by position in the param groups
        (the state's keys are parameter ids in `Optimizer.state_dict`, names in torch's distributed checkpoint)."""
        found = []
        for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
            for param, key in zip(group["params"], saved["params"]):
                if id(param) in experts and key in state_dict["state"]:
                    found.append((state_dict["state"][key], param, experts[id(param)]))
        return found

    def to_global(opt, state_dict: dict) -> dict:
        for state, _, num_experts in expert_states(state_dict):
            for key, value in state.items():
                if isinstance(value, DTensor) and value.device_mesh is not mesh and value.dim() > 0:
                    state[key] = _all_experts_view(value, mesh, num_experts)
        return state_dict

    def to_local(opt, state_dict: dict) -> dict:
        for state, param, _ in expert_states(state_dict):
            for key, value in state.items():
                if isinstance(value, DTensor) and value.device_mesh is mesh:
                    state[key] = _local_experts_view(value, param)
        return state_dict

    optimizer.register_state_dict_post_hook(to_global)
    optimizer.register_load_state_dict_pre_hook(to_local)


def _switch_optimizer(
    optimizer: torch.optim.Optimizer, names: dict[int, str], sharded: dict[str, nn.Parameter]
) -> None:
    """Point `optimizer` (built on the unsharded model, no state yet) at the sharded parameters of the same names."""
    if optimizer.state:
        raise ValueError("fully_shard_moe(optimizer=...): the optimizer already has state; pass one that has not "
                         "stepped yet.")
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
