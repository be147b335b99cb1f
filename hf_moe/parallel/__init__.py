"""Expert parallelism over process groups that accelerate manages.

    model = hf_moe.HfMoeForCausalLM.from_pretrained(path, expert_parallel_size=2)  # under accelerate launch
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)       # DDP for the rest
    ...
    accelerator.backward(loss)
    hf_moe.parallel.finish_gradients(model, max_norm=1.0)   # expert-grad sync + EP-aware clipping
    optimizer.step()

With FSDP2 (`FullyShardedDataParallelPlugin(fsdp_version=2)`), shard before `prepare`:
`hf_moe.fully_shard_moe(model, accelerator, optimizer)` (see `hf_moe.parallel.fsdp`).
"""

from .all_to_all import AllToAllDispatcher
from .checkpoint import (
    from_pretrained_expert_parallel,
    gather_state_dict,
    load_expert_parallel,
    save_adapter_expert_parallel,
    save_expert_parallel,
)
from .fsdp import checkpoint_optimizer_as_all_experts, fully_shard_moe
from .grads import clip_grad_norm_, finish_gradients, grad_norm, sync_expert_gradients
from .groups import ExpertParallelGroups, init_expert_parallel
from .sharding import expert_parallel_groups, expert_parallelize, expert_parameter_names, prepare_for_ddp

__all__ = [
    "AllToAllDispatcher",
    "ExpertParallelGroups",
    "checkpoint_optimizer_as_all_experts",
    "clip_grad_norm_",
    "expert_parallel_groups",
    "expert_parallelize",
    "finish_gradients",
    "from_pretrained_expert_parallel",
    "fully_shard_moe",
    "gather_state_dict",
    "grad_norm",
    "init_expert_parallel",
    "expert_parameter_names",
    "load_expert_parallel",
    "prepare_for_ddp",
    "save_adapter_expert_parallel",
    "save_expert_parallel",
    "sync_expert_gradients",
]
