"""Expert-parallel process groups, built from the distributed state that accelerate manages.

W ranks = P (expert-parallel group size) × D (expert-data-parallel replicas). Expert-parallel groups are P
contiguous ranks; rank r of an EP group owns experts [r·E/P, (r+1)·E/P). Expert-data-parallel groups are strided
(ranks with the same EP rank), and hold replicas of the same experts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's place in the W = P × D layout and the process groups it belongs to."""

    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    ep_size: int
    ep_rank: int
    edp_size: int
    edp_rank: int
    world_size: int

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """[start, end) of the global expert indices this rank owns."""
        local = num_experts // self.ep_size
        return self.ep_rank * local, (self.ep_rank + 1) * local


def init_expert_parallel(ep_size: int, num_experts: int | None = None) -> ExpertParallelGroups:
    """Create the EP and expert-data-parallel groups (collective: every rank must call it with the same values).

    Initialises torch.distributed from the launcher's environment through accelerate's `PartialState` when needed.
    Raises the same clear error on every rank for an impossible layout, so nothing hangs. The groups take the
    default group's timeout (accelerate's `InitProcessGroupKwargs(timeout=...)`: create the `Accelerator` first),
    so a stalled rank ends the job within it.
    """
    from accelerate import PartialState

    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert_parallel_size={ep_size!r} is invalid: expected a positive integer.")
    state = PartialState(cpu=not torch.cuda.is_available())  # without a GPU, gloo over CPU processes
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"expert_parallel_size={ep_size} needs a distributed launch (accelerate launch --num_processes N, adding "
            f"--multi_gpu on machines without GPUs, or torchrun --nproc_per_node N); this process has no distributed "
            f"state (accelerate sees {state.num_processes} process)."
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if state.num_processes != world:
        # accelerate would then skip DDP in `prepare`, and the replicated weights would silently drift apart
        raise RuntimeError(
            f"accelerate's state sees {state.num_processes} process(es) but torch.distributed has {world}: an "
            "Accelerator or PartialState was created before expert parallelism in a mode that does not match the "
            "launch. Without GPUs, create it with Accelerator(cpu=True) (or launch with `accelerate launch "
            "--multi_gpu`), or load the model before creating it."
        )
    _check_same_on_every_rank(ep_size, num_experts)
    if world % ep_size:
        raise ValueError(f"expert_parallel_size={ep_size} is invalid: expected a divisor of the world size {world}.")
    if num_experts is not None and num_experts % ep_size:
        raise ValueError(f"expert_parallel_size={ep_size} is invalid: expected a divisor of num_experts={num_experts}.")
    timeout = _default_group_timeout()
    ep_group = edp_group = None
    for start in range(0, world, ep_size):
        group = dist.new_group(list(range(start, start + ep_size)), timeout=timeout)
        if start <= rank < start + ep_size:
            ep_group = group
    for offset in range(ep_size):
        group = dist.new_group(list(range(offset, world, ep_size)), timeout=timeout)
        if rank % ep_size == offset:
            edp_group = group
    return ExpertParallelGroups(ep_group=ep_group, edp_group=edp_group, ep_size=ep_size, ep_rank=rank % ep_size,
                                edp_size=world // ep_size, edp_rank=rank // ep_size, world_size=world)


def _default_group_timeout() -> timedelta | None:
    """The collective timeout of the default process group, the one the user set at `init_process_group`.

    `dist.new_group` without a timeout falls back to the backend's global default (30 min for gloo, 10 for NCCL),
    not to the default group's, so every group built here passes this one explicitly. torch has no public getter:
    the value lives in the default group's backend options.
    """
    device = torch.device("cuda" if "nccl" in dist.get_backend() else "cpu")
    try:
        return dist.group.WORLD._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):  # another torch keeps it elsewhere: say so rather than fail to start
        warnings.warn(
            "hf_moe could not read the default process group's timeout from this torch version; the expert-parallel "
            "groups use torch's default timeout instead of the one set at init_process_group.",
            stacklevel=3,
        )
        return None


def _check_same_on_every_rank(ep_size: int, num_experts: int | None) -> None:
    """All ranks must agree on the layout; a mismatch would hang the first all-to-all."""
    mine = torch.tensor([ep_size, -1 if num_experts is None else num_experts], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    values = {tuple(t.tolist()) for t in everyone}
    if len(values) > 1:
        raise ValueError(f"ranks disagree on (expert_parallel_size, num_experts): {sorted(values)}; every rank must "
                         "load the same model with the same expert_parallel_size.")
