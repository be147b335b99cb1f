"""The local dispatcher: how an MoE block hands its tokens to experts that all live in this process.

Every dispatcher keeps one contract, `dispatcher(x [T, H], routing, experts) -> [T, H]`: run the routed experts on
the tokens as `routing` assigns them and return, for every token, the weighted sum of its experts' outputs. The
block calls nothing else, so where the experts live (here, or sharded over an expert-parallel group:
`hf_moe.parallel.AllToAllDispatcher`) is the dispatcher's business alone.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import run_experts
from .types import RouterOutput


class LocalDispatcher:
    """All experts in this process (the default). Dropless routing goes to the experts as it is; routing with
    sentinel slots (a capacity, expert choice) goes through `run_experts`, which compacts the sentinels away
    for experts implementations that do not skip them."""

    capturable = True
    """Waits for the GPU nowhere itself, so CUDA graphs may capture it (the experts implementation must not either)."""

    def __call__(self, x: torch.Tensor, routing: RouterOutput, experts: nn.Module) -> torch.Tensor:
        if routing.capacity is None:  # no sentinel slot
            return experts(x, routing.top_k_index, routing.top_k_weights)
        return run_experts(experts, x, routing.top_k_index, routing.top_k_weights)
