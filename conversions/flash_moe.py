"""FlashMoE (github flash-algo/flash-moe) layers as hf-moe product-key blocks: the config fields and the weights.

FlashMoE's `FlashMoE` module is a SwiGLU MLP plus N² singleton experts routed by product keys over
`BatchNorm1d(affine=False)`-normalised inputs. An `HfMoeSparseMoeBlock` built from [`flash_moe_config_fields`] holds
the same function: the dense MLP is the shared expert, `down_embed` (read against x) is the non-gated experts'
`up_proj [E, 1, H]` and `up_embed` (written out) their `down_proj [E, H, 1]`.
"""

from __future__ import annotations

from typing import Any

import torch

_SHARED = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
_ROUTER_NORM = {"running_mean", "running_var", "num_batches_tracked"}


def flash_moe_config_fields(
    hidden_size: int, intermediate_size: int, hidden_act: str, num_experts: int, num_experts_per_tok: int,
    norm_topk_prob: bool = False,
) -> dict[str, Any]:
    """`HfMoeConfig` fields of a product-key layer equal to `FlashMoE(FlashMoEConfig(...))` with these arguments."""
    return dict(
        hidden_size=hidden_size, hidden_act=hidden_act, router_type="product_key", num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok, norm_topk_prob=norm_topk_prob, moe_intermediate_size=1,
        gated_experts=False, num_shared_experts=1, shared_expert_intermediate_size=intermediate_size,
        product_key_query_norm="batch_norm",
    )


def flash_moe_block_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `FlashMoE` module's state dict → the state dict of the equal `HfMoeSparseMoeBlock`."""
    out = {}
    for name, tensor in state_dict.items():
        if name in _SHARED:
            out[f"shared_experts.{name}"] = tensor
        elif name == "router_gate.weight":
            out["router.weight"] = tensor
        elif name.startswith("router_norm.") and name.split(".", 1)[1] in _ROUTER_NORM:
            out[f"router.norm.{name.split('.', 1)[1]}"] = tensor
        elif name == "down_embed.weight":
            out["experts.up_proj"] = tensor.unsqueeze(1)
        elif name == "up_embed.weight":
            out["experts.down_proj"] = tensor.unsqueeze(2)
        else:
            raise ValueError(f"flash_moe_block_state_dict: unexpected FlashMoE tensor {name!r}; expected the shared "
                             f"MLP's {sorted(_SHARED)}, router_gate, router_norm buffers, down_embed and up_embed.")
    return out
