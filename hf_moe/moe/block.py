"""The MoE block: router → dispatcher (→ experts) → combined output, plus optional shared experts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import nn

from ..configuration_hf_moe import HfMoeConfig
from .dispatch import LocalDispatcher
from .experts import build_experts
from .mlp import HfMoeMLP
from .router.registry import build_router
from .types import RouterOutput


class Dispatcher(Protocol):
    """Runs the routed experts and combines their outputs per token (see `hf_moe.moe.dispatch`)."""

    capturable: bool
    """Whether CUDA graphs can capture it (it never waits for the GPU)."""

    def __call__(self, x: torch.Tensor, routing: RouterOutput, experts: nn.Module) -> torch.Tensor: ...


class BlockGraphs(Protocol):
    """CUDA graphs that replay a block's `compute` for the calls they serve (see `hf_moe.moe.cuda_graphs`)."""

    def serves(self, block: nn.Module, hidden_states: torch.Tensor, token_mask: torch.Tensor | None) -> bool: ...

    def __call__(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, RouterOutput]: ...


class RoutingRecord(nn.Module):
    """Where a block's routing can be observed: [`record_routing`] and the Trainer callback hook this module, which
    sees the block's [`RouterOutput`] whether the block ran eagerly or replayed CUDA graphs. Returns it as it is."""

    def forward(self, routing: RouterOutput) -> RouterOutput:
        return routing


class HfMoeSparseMoeBlock(nn.Module):
    """One mixture-of-experts layer: `[B, S, H]` → `[B, S, H]`.

    The router decides, the dispatcher runs the experts and combines their outputs (`LocalDispatcher` in one process;
    `hf_moe.parallel` installs an all-to-all one with `set_dispatcher`), the shared experts add their dense output.
    The router's decisions go through `self.routing` (see [`record_routing`]) and, with `output_routing=True`, back to
    the caller: the model collects its layers' routing from their outputs, with no hook (torch.compile traces a block
    or a layer compiled on its own as it traces the whole model, and FSDP2 sees the routing's tensors as outputs).
    """

    def __init__(self, config: HfMoeConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.router = build_router(config, layer_idx)
        self.router_reads_token_ids = self.router.reads_token_ids
        """Whether the router routes by token id (read once: a PEFT wrapper added later routes as its router)."""
        self.experts = build_experts(config)
        self.shared_experts = HfMoeMLP(config, config.shared_expert_size) if config.shared_expert_size else None
        self.shared_expert_gate = (
            nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        )
        self.routing = RoutingRecord()
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.cuda_graphs: BlockGraphs | None = None

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Route tokens to the experts through `dispatcher` from now on."""
        self.dispatcher = dispatcher

    def set_cuda_graphs(self, graphs: BlockGraphs | None) -> None:
        """Replay `graphs` for the calls they serve (`None`: always run eagerly)."""
        self.cuda_graphs = graphs

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        output_routing: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, RouterOutput]:
        """`token_mask` `[B·S]` marks real tokens, `input_ids` `[B, S]` are the token ids (routers that route by
        token id read them); `output_routing=True` returns `(output, routing)`."""
        if self.cuda_graphs is not None and self.cuda_graphs.serves(self, hidden_states, token_mask):
            out, routing = self.cuda_graphs(hidden_states, token_mask)
        else:
            out, routing = self.compute(hidden_states, token_mask, input_ids)
        self.routing(routing)
        return (out, routing) if output_routing else out

    def compute(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        """The block's computation, always eager (what CUDA graphs capture): the output and the router's decisions."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if not self.router_reads_token_ids:
            input_ids = None
        # The shared experts' GEMMs go first: the GPU runs them while the host issues the router's small kernels.
        shared = None if self.shared_experts is None else self.shared_experts(x)
        if shared is not None and self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        routing = self.router(
            x,
            token_mask,
            input_ids=None if input_ids is None else input_ids.reshape(-1),
            sequence_length=shape[1] if hidden_states.dim() == 3 else None,
        )
        out = self.dispatcher(x, routing, self.experts)
        if shared is not None:
            out = out + shared
        return out.view(shape), routing


def token_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """Flat `[B·S]` bool mask of the real tokens of the current step from a 2D padding mask, else `None`."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:].bool().reshape(-1)


def moe_blocks(model: nn.Module) -> list[HfMoeSparseMoeBlock]:
    """The MoE blocks of `model`, in module order; looks through DDP, PEFT and accelerate wrappers."""
    return [module for module in model.modules() if isinstance(module, HfMoeSparseMoeBlock)]


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The routed experts of every MoE block of `model` (PEFT-wrapped ones included), by qualified module name."""
    return {f"{name}.experts" if name else "experts": block.experts
            for name, block in model.named_modules() if isinstance(block, HfMoeSparseMoeBlock)}


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[list[RouterOutput]]:
    """Collect the [`RouterOutput`] of every MoE block of `model` that runs inside the `with`, in call order.

        with hf_moe.record_routing(block) as routings:
            out = block(x)
        routings[0].top_k_index
    """
    recorded: list[RouterOutput] = []
    hooks = [block.routing.register_forward_hook(lambda module, args, output: recorded.append(output))
             for block in moe_blocks(model)]
    try:
        yield recorded
    finally:
        for hook in hooks:
            hook.remove()
