"""Shared by the torchrun workers and the tests that check them: the skewed routing patched identically in a
worker and in the single-process reference, this rank's rows of the global batch, and results moved to the CPU."""

import torch
import torch.distributed as dist


def skew_routing() -> None:
    """Send every token to experts 0 and 1 (weights: their renormalised probabilities), so that the other experts,
    and under P=4 whole ranks, receive no tokens. Patched identically in the worker and the test's reference."""
    from hf_moe import HfMoeRouter, RouterOutput, load_balancing_loss, router_z_loss

    def forward(self, hidden_states, token_mask=None, **kwargs):
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        logits = torch.nn.functional.linear(hidden_states.to(dtype), self.weight.to(dtype))
        probs = logits.softmax(dim=-1)
        index = torch.tensor([0, 1], device=hidden_states.device).expand(hidden_states.shape[0], 2)
        weights = probs[:, :2] / probs[:, :2].sum(dim=-1, keepdim=True)
        aux, counts = load_balancing_loss(probs, index, self.num_experts, token_mask, reduce=self.loss_reduction)
        return RouterOutput(logits, index, weights.to(hidden_states.dtype), counts, aux,
                            router_z_loss(logits, token_mask))

    HfMoeRouter.forward = forward


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the global batch, on this rank's device (the tests also run on GPUs with NCCL)."""
    from accelerate import PartialState

    rows = batch.shape[0] // dist.get_world_size()
    return batch[dist.get_rank() * rows : (dist.get_rank() + 1) * rows].to(PartialState().device)


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value
