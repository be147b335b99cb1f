"""The experts' weight gradients: deferred to a `WeightGradQueue` and run by the end of backward, kept in
autograd for weights that are not leaves, accumulated like autograd's, and never both alive at once."""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from hf_moe.moe.experts import HfMoeExperts, grouped_experts_forward
from hf_moe.parallel.weight_grad_queue import WeightGradQueue

from .experts_cases import NAMES, forward_and_grads, make_experts, make_routing, reference, rel_err


def test_deferred_weight_grads_run_by_the_end_of_backward_and_accumulate():
    """With a `WeightGradQueue` (expert parallelism), the experts' backward leaves both weight gradients to the
    queue: they are still pending when the gradient reaches the input, run when the backward pass ends at the
    latest, equal the float64 reference, and accumulate over backward passes as autograd's would."""
    experts = make_experts(top_k=2)
    index, weights = make_routing(29, experts.num_experts, 2, "skewed")
    x = torch.randn(29, experts.hidden_dim, dtype=torch.float64)
    queue, pending_at_input = WeightGradQueue(), []

    def deferred(experts, x, index, weights):
        x.register_hook(lambda grad: pending_at_input.append((len(queue), experts.gate_up_proj.grad is None)))
        return grouped_experts_forward(experts, x, index, weights, weight_grads=queue)

    got = forward_and_grads(deferred, experts, x, index, weights)
    assert pending_at_input == [(2, True)] and len(queue) == 0
    for name, g, w in zip(NAMES, got, reference(experts, x, index, weights)):
        assert rel_err(g, w) < 1e-12, name
    first = [experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()]
    out = grouped_experts_forward(experts, x, index, weights, weight_grads=queue)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * probe).sum().backward()  # no zero_grad: the second pass adds to the first
    assert torch.equal(experts.gate_up_proj.grad, 2 * first[0]) and torch.equal(experts.down_proj.grad, 2 * first[1])


def test_weights_that_are_not_leaves_keep_their_gradients_in_autograd():
    """PEFT feeds the experts `base + ΔW`, not a parameter: nothing is deferred and the gradient reaches the
    parameter behind it through autograd."""
    experts = make_experts(top_k=2)
    index, weights = make_routing(23, experts.num_experts, 2, "uniform")
    x = torch.randn(23, experts.hidden_dim, dtype=torch.float64)
    want = reference(experts, x, index, weights)
    queue, pending_at_input = WeightGradQueue(), []

    scale = torch.ones((), dtype=torch.float64, requires_grad=True)

    def merged(experts, x, index, weights):  # the experts as PEFT's target_parameters wrapper presents them
        x.register_hook(lambda grad: pending_at_input.append(len(queue)))
        view = SimpleNamespace(num_experts=experts.num_experts, config=experts.config, act_fn=experts.act_fn,
                               gate_up_proj=experts.gate_up_proj * scale, down_proj=experts.down_proj * scale)
        return grouped_experts_forward(view, x, index, weights, weight_grads=queue)

    got = forward_and_grads(merged, experts, x, index, weights)
    assert pending_at_input == [0] and scale.grad is not None
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-12, name


class _FreshWeightGrads(TorchDispatchMode):
    """Watches every op's outputs: tensors shaped like an expert weight (`shapes`) that are not `known` (the
    parameters and their existing `.grad`, which in-place accumulation returns) are fresh weight gradients. After
    each op it records which shapes have a fresh tensor alive."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], known: list[torch.Tensor]):
        super().__init__()
        self.shapes, self.known = shapes, {id(t) for t in known}
        self.fresh: list[tuple[tuple[int, ...], weakref.ref]] = []
        self.alive_together: list[set[tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes and id(t) not in self.known:
                self.fresh.append((tuple(t.shape), weakref.ref(t)))
        self.alive_together.append({shape for shape, ref in self.fresh if ref() is not None})
        return out


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_accumulating_backward_never_holds_both_expert_weight_gradients(act):
    """With gradients accumulating into existing `.grad` (gradient accumulation), backward adds the down
    projection's weight gradient into `.grad` and frees it before it computes the gate/up projection's: the two
    fresh `[E, H, I]` and `[E, 2I, H]` tensors are never alive at once (transformers' experts behave so too; one
    autograd node returning both kept an extra expert-weight-sized tensor at the backward peak)."""
    experts = make_experts(hidden=32, inter=48, experts=4, top_k=2, act=act, dtype=torch.float32)
    index, weights = make_routing(40, 4, 2, "skewed", dtype=torch.float32)
    x = torch.randn(40, 32, requires_grad=True)
    weights.requires_grad_(True)
    grouped_experts_forward(experts, x, index, weights).square().sum().backward()  # `.grad` now exists
    first = [experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()]
    params = [experts.gate_up_proj, experts.down_proj]
    down, gate_up = tuple(experts.down_proj.shape), tuple(experts.gate_up_proj.shape)
    loss = grouped_experts_forward(experts, x, index, weights).square().sum()
    with _FreshWeightGrads((down, gate_up), params + [p.grad for p in params]) as watch:
        loss.backward()
    assert {shape for shape, _ in watch.fresh} == {down, gate_up}, "backward made both weight gradients"
    assert not any(alive == {down, gate_up} for alive in watch.alive_together), "both alive at once"
    assert torch.equal(experts.gate_up_proj.grad, 2 * first[0]) and torch.equal(experts.down_proj.grad, 2 * first[1])


@pytest.mark.parametrize("deferred", [False, True])
def test_accumulated_gradients_match_float64_reference(deferred):
    """Two float32 backward passes with different output gradients and no zero_grad in between accumulate, in
    every gradient (input, routing weights, both projections), the sum of the two float64 reference gradients."""
    experts = make_experts(hidden=64, inter=96, experts=6, top_k=3, dtype=torch.float32)
    index, weights = make_routing(50, 6, 3, "skewed", dtype=torch.float32)
    x = torch.randn(50, 64)
    ref = make_experts(64, 96, 6, top_k=3, dtype=torch.float64)
    with torch.no_grad():
        ref.gate_up_proj.copy_(experts.gate_up_proj)
        ref.down_proj.copy_(experts.down_proj)
    queue = WeightGradQueue() if deferred else None
    leaves = [x.requires_grad_(True), weights.requires_grad_(True), experts.gate_up_proj, experts.down_proj]
    ref_leaves = [x.detach().double().requires_grad_(True), weights.detach().double().requires_grad_(True),
                  ref.gate_up_proj, ref.down_proj]
    for seed in (1, 2):
        probe = torch.randn(50, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out = grouped_experts_forward(experts, x, index, weights, weight_grads=queue)
        (out.double() * probe).sum().backward()
        want = HfMoeExperts.forward.__wrapped__(ref, ref_leaves[0], index, ref_leaves[1])
        (want * probe).sum().backward()
    assert queue is None or len(queue) == 0
    for name, got, want in zip(("d_hidden", "d_weights", "d_gate_up", "d_down"), leaves, ref_leaves):
        assert rel_err(got.grad.double(), want.grad) < 1e-5, name
