"""The capacity-padded experts implementation, `hf_moe_capacity`: fixed `[E, capacity, H]` buffers and two
batched GEMMs with static shapes."""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..capacity import expert_capacity, slot_positions


def capacity_padded_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts over fixed `[E, capacity, H]` buffers: two batched GEMMs with static shapes.

    The capacity is the configured one when the router enforces it (`drop_tokens=True` or expert choice) so
    shapes depend only on the batch size (what torch.compile and CUDA graphs want); otherwise it is the
    largest expert load of this batch (one host sync), which makes this path dropless. Sentinel slots and
    empty buffer rows compute nothing that reaches the output. Meant for one process: under expert
    parallelism the dispatcher brings its own kernel.
    """
    num_tokens, top_k = top_k_index.shape
    num_experts = self.num_experts
    config = self.config
    enforced = config.drop_tokens or config.router_type == "expert_choice"
    if enforced and num_experts == config.num_experts:
        capacity = expert_capacity(config, num_tokens, self.training)
    else:
        valid = top_k_index[top_k_index < num_experts]
        capacity = int(torch.bincount(valid, minlength=num_experts).max()) if valid.numel() else 0
    position = slot_positions(top_k_index, num_experts)
    keep = (top_k_index < num_experts) & (position < capacity)
    trash = num_experts * capacity  # one extra buffer row collects sentinel slots
    dest = torch.where(keep, top_k_index * capacity + position, trash).reshape(-1)

    token_of_slot = torch.arange(num_tokens, device=hidden_states.device).repeat_interleave(top_k)
    buffer = hidden_states.new_zeros(trash + 1, hidden_states.shape[-1])
    buffer = buffer.index_copy(0, dest, hidden_states[token_of_slot])
    x = buffer[:trash].view(num_experts, capacity, -1)
    projected = torch.bmm(x, self.input_proj.transpose(1, 2))
    y = torch.bmm(self.activation(projected), self.down_proj.transpose(1, 2)).reshape(trash, -1)
    y = torch.cat([y, y.new_zeros(1, y.shape[-1])])[dest]  # sentinel slots read the zero row
    y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
    return y.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register("hf_moe_capacity", capacity_padded_experts_forward)
