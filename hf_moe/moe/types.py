"""Types shared by the router, the dispatchers and the experts: [`RouterOutput`] and the sentinel-slot contract.

Sentinel slots: a (token, slot) pair that no expert processes (dropped over capacity, padding under capacity, an
expert-choice column whose expert did not take the token) carries the expert index `num_experts`, one past the
last expert, and the combine weight 0. Counts, losses, dispatchers and experts skip it, so the token keeps only
its residual (and its other experts). [`assigned_slots`] tells the two apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch
import torch.utils._pytree as pytree

from .router.losses import router_z_loss


def assigned_slots(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[T, k]` bool: the slots that go to an expert, i.e. not the sentinel `num_experts`."""
    return top_k_index < num_experts


class _ComputedOnRead:
    """Default of a [`RouterOutput`] field that is computed from the other fields on first read and then kept, so a
    forward pays nothing (no kernel launch, no host time) for a statistic nobody reads
    (docs/decisions/router-host-ops.md). A value given to the constructor or assigned later is kept as it is;
    `None` means "compute on read".

    The value is computed with gradient tracking on, as the forward would have: a first read under `no_grad` (a
    metrics hook) must not hand a detached value to the loss that reads it next."""

    def __init__(self, compute: Callable[[RouterOutput], torch.Tensor]) -> None:
        self.compute = compute

    def __set_name__(self, owner: type, name: str) -> None:
        # The value lives in the instance under another name: torch.compile (torch 2.11) reads an instance's
        # `__dict__` entry of a field's own name through the field's descriptor again, without end.
        self.slot = f"_{name}"

    def __get__(self, output: RouterOutput | None, owner: type | None = None) -> torch.Tensor | None:
        if output is None:  # class access: the dataclass field's default
            return None
        value = getattr(output, self.slot, None)
        if value is None:
            with torch.enable_grad():
                value = self.compute(output)
            setattr(output, self.slot, value)
        return value

    def __set__(self, output: RouterOutput, value: torch.Tensor | None) -> None:
        setattr(output, self.slot, value)

    def given(self, output: RouterOutput) -> torch.Tensor | None:
        """The value set on `output` (by its router or an assignment), None when it would be computed on read."""
        return getattr(output, self.slot, None)


class RoutingStatistics(Protocol):
    """What computes a [`RouterOutput`]'s routing statistics on first read: the router's settings and what the
    output does not hold (the selection before capacity dropping, the sequence length)."""

    def tokens_per_expert(self, output: RouterOutput) -> torch.Tensor: ...

    def aux_loss(self, output: RouterOutput) -> torch.Tensor: ...

    def token_entropy(self, output: RouterOutput) -> torch.Tensor | None: ...

    # Optional: `z_loss(output)`, for routers whose z-loss is not `router_z_loss` of their logits.


def _from_statistics(name: str) -> _ComputedOnRead:
    """A field that `RouterOutput.statistics` computes on first read (None without statistics)."""

    def compute(output: RouterOutput) -> torch.Tensor | None:
        return None if output.statistics is None else getattr(output.statistics, name)(output)

    return _ComputedOnRead(compute)


def _z_loss(output: RouterOutput) -> torch.Tensor:
    """The statistics' `z_loss` where they define one (routers whose logits are not one softmax, e.g. product keys'
    halves), else [`router_z_loss`] of the logits."""
    z_loss = getattr(output.statistics, "z_loss", None)
    return router_z_loss(output.logits, output.token_mask) if z_loss is None else z_loss(output)


ROUTER_STATISTICS = ("tokens_per_expert", "aux_loss", "token_entropy")
"""The [`RouterOutput`] fields its `statistics` compute on first read: the router's forward leaves them out, so
inference, where nobody reads them, launches none of their kernels."""


@dataclass
class RouterOutput:
    """What one MoE layer's router decided for a flat batch of T tokens.

    Attributes:
        logits: `[T, E]` float32 (float64 in a float64 model) router logits; zeros for routers without a
            learned gate (hash, fake_balanced); product keys: `[T, heads·2N]`, each head's two halves of N.
        top_k_index: `[T, k]` chosen experts; `num_experts` marks a dropped / unassigned (sentinel) slot
            (for expert choice k = E: column e is e where expert e took the token).
        top_k_weights: `[T, k]` combine weights (dtype of the hidden states), 0 on sentinel slots.
        tokens_per_expert: `[E]` (token, slot) pairs each expert processes, padding and dropped slots excluded;
            when not given, computed by `statistics` on first read.
        aux_loss: load-balancing loss of this layer (see [`load_balancing_loss`]); when not given, computed by
            `statistics` on first read (from the selection before dropping).
        z_loss: router z-loss of this layer (see [`router_z_loss`]); when not given, computed on first read by
            `statistics` where they define `z_loss`, else from `logits` and `token_mask`.
        probs: `[T, E]` float32 routing distribution (softmax, or sigmoid scores normalised per token) used by
            the aux loss and the routing-entropy metric.
        token_mask: `[T]` real (non-padding) tokens, or None when every token is real.
        capacity: slots per expert when capacity applies (dropping, expert choice), else None.
        drop_fraction: 0-dim float32: token choice: dropped real slots / real slots; expert choice: real tokens
            no expert took / real tokens. When not given (nothing can drop), 0 on first read.
        token_entropy: `[T]` entropy (nats) of each token's routing distribution, given by routers whose
            distribution is never held as a `[T, E]` tensor (product keys: the sum of the two halves' entropies),
            computed by `statistics` on first read; None: the routing-entropy metric computes it from `probs`.
        statistics: what computes `tokens_per_expert`, `aux_loss` and `token_entropy` when they are read (the
            router sets it); None when those are given. Not a pytree child: flattening computes those fields.
    """

    logits: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    tokens_per_expert: torch.Tensor | None = _from_statistics("tokens_per_expert")
    aux_loss: torch.Tensor | None = _from_statistics("aux_loss")
    z_loss: torch.Tensor | None = _ComputedOnRead(_z_loss)
    probs: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    capacity: int | None = None
    drop_fraction: torch.Tensor | None = _ComputedOnRead(lambda output: output.logits.new_zeros(()))
    token_entropy: torch.Tensor | None = _from_statistics("token_entropy")
    statistics: RoutingStatistics | None = field(default=None, repr=False, compare=False)

    def given(self, name: str) -> torch.Tensor | None:
        """Field `name` as it was set, without computing a field that is computed on read (None then)."""
        field = type(self).__dict__.get(name)
        return field.given(self) if isinstance(field, _ComputedOnRead) else getattr(self, name)

    def carried(self, name: str) -> torch.Tensor | None:
        """Field `name` as flattening and CUDA graphs carry it: what `statistics` compute is computed now (they do
        not travel), any other field as it was set (None: computed again on read from the carried fields)."""
        if name in ROUTER_STATISTICS or (name == "z_loss" and hasattr(self.statistics, "z_loss")):
            return getattr(self, name)
        return self.given(name)


# A pytree node, so that torch.export and torch.compile take a model output that holds RouterOutputs
# (`output_router_logits=True`): its tensors are the children; `capacity` (an int or None) is the context. The
# statistics, which need the router, are computed when flattened; another field computed on read that nobody read
# yet stays None (computed on read after unflattening too).
_TENSOR_FIELDS = tuple(f.name for f in fields(RouterOutput) if f.name not in ("capacity", "statistics"))


def _flatten(output: RouterOutput) -> tuple[list[torch.Tensor | None], int | None]:
    values = [output.carried(name) for name in _TENSOR_FIELDS]
    return values, output.capacity


def _unflatten(values, capacity: int | None) -> RouterOutput:
    return RouterOutput(**dict(zip(_TENSOR_FIELDS, values)), capacity=capacity)


def _flatten_with_keys(output: RouterOutput):
    values, capacity = _flatten(output)
    return [(pytree.GetAttrKey(name), value) for name, value in zip(_TENSOR_FIELDS, values)], capacity


pytree.register_pytree_node(
    RouterOutput, _flatten, _unflatten, serialized_type_name="hf_moe.RouterOutput",
    flatten_with_keys_fn=_flatten_with_keys,
)
