"""Load balancing: the switch and sequence losses (against the formula and transformers' own loss), the
z-loss, routing statistics computed only when read, and aux-loss-free expert-bias balancing."""

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import hf_moe
from hf_moe import HfMoeRouter, load_balancing_loss, router_z_loss, sequence_load_balancing_loss, update_expert_bias

from .conftest import assert_rel_close, tiny_config
from .routing_cases import H, descending, make_router, ref_logits, ref_softmax


def ref_switch_loss(probs, index, num_experts, mask=None) -> float:
    rows = [t for t in range(len(probs)) if mask is None or mask[t]]
    f = [sum(row.count(e) for row in (index[t] for t in rows)) / len(rows) for e in range(num_experts)]
    p = [sum(probs[t][e] for t in rows) / len(rows) for e in range(num_experts)]
    return num_experts * sum(fi * pi for fi, pi in zip(f, p))


def test_switch_loss_equals_the_formula_and_transformers():
    router = make_router(num_experts=5, num_experts_per_tok=2)
    x = torch.randn(3 * 7, H)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    out = router(x, mask.reshape(-1).bool())
    probs = [ref_softmax(row) for row in ref_logits(router, x).tolist()]
    expected = ref_switch_loss(probs, out.top_k_index.tolist(), 5, mask.reshape(-1).tolist())
    assert_rel_close(out.aux_loss, torch.tensor(expected), 1e-5, "switch loss")
    theirs = load_balancing_loss_func((out.logits,), 5, 2, mask)
    assert_rel_close(out.aux_loss, theirs, 1e-5, "transformers")
    logsumexp = [math.log(sum(math.exp(v) for v in row)) for row in ref_logits(router, x).tolist()]
    real = [z * z for z, m in zip(logsumexp, mask.reshape(-1).tolist()) if m]
    assert_rel_close(out.z_loss, torch.tensor(sum(real) / len(real)), 1e-5, "z loss")


def test_sequence_loss_equals_the_per_sequence_formula():
    router = make_router(num_experts=5, num_experts_per_tok=2, router_aux_loss_type="sequence",
                         scoring_func="sigmoid")
    x = torch.randn(4 * 6, H)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, :2] = False
    mask[3] = False  # an all-padding sequence counts for nothing
    out = router(x, mask.reshape(-1), sequence_length=6)
    scores = (1 / (1 + (-ref_logits(router, x)).exp())).tolist()
    probs = [[s / sum(row) for s in row] for row in scores]
    index = out.top_k_index.tolist()
    per_sequence = []
    for b in range(3):
        rows = range(6 * b, 6 * b + 6)
        per_sequence.append(ref_switch_loss([probs[t] for t in rows], [index[t] for t in rows], 5,
                                            mask[b].tolist()))
    assert_rel_close(out.aux_loss, torch.tensor(sum(per_sequence) / 3), 1e-5, "sequence loss")
    one_sequence = sequence_load_balancing_loss(out.probs[:6], out.top_k_index[:6], 5, 6)
    assert_rel_close(one_sequence, load_balancing_loss(out.probs[:6], out.top_k_index[:6], 5)[0], 1e-6, "B=1")
    assert make_router(router_aux_loss_type="none")(x).aux_loss == 0


def test_losses_under_perfect_balance_equal_k():
    num_tokens, num_experts, top_k = 12, 6, 2
    probs = torch.full((num_tokens, num_experts), 1 / num_experts)
    index = (torch.arange(num_tokens)[:, None] * top_k + torch.arange(top_k)) % num_experts
    assert_rel_close(load_balancing_loss(probs, index, num_experts)[0], torch.tensor(2.0), 1e-6, "switch")
    assert_rel_close(sequence_load_balancing_loss(probs, index, num_experts, 6), torch.tensor(2.0), 1e-6, "seq")
    assert_rel_close(router_z_loss(torch.zeros(3, num_experts)), torch.tensor(math.log(6) ** 2), 1e-6, "z")


@pytest.mark.parametrize("masked", [False, True])
def test_z_loss_and_drop_fraction_are_computed_on_read(masked):
    router = make_router().train()
    x = torch.randn(10, H)
    mask = torch.tensor([False, True] * 5) if masked else None
    out = router(x, mask)
    assert vars(out).get("z_loss") is None, "the forward computed the z-loss nobody read"
    with torch.no_grad():  # a metrics hook reads it first: the loss that reads it next still gets a gradient
        z_loss = out.z_loss
    assert out.z_loss is z_loss and torch.equal(z_loss, router_z_loss(out.logits, mask))
    (grad,) = torch.autograd.grad(z_loss, router.weight, retain_graph=True)
    (expected,) = torch.autograd.grad(router_z_loss(out.logits, mask), router.weight)
    assert torch.equal(grad, expected)
    assert out.drop_fraction.dtype == torch.float32 and out.drop_fraction == 0
    given = torch.tensor(3.0)
    assert hf_moe.RouterOutput(out.logits, out.top_k_index, out.top_k_weights, out.tokens_per_expert,
                               out.aux_loss, given).z_loss is given


def _count_statistics_calls(monkeypatch) -> list[str]:
    """Record each call of the functions that compute routing statistics, in the router modules that call them."""
    from hf_moe.moe.router import product_key, topk

    calls = []
    for module, names in ((topk, ("expert_counts", "switch_loss", "sequence_load_balancing_loss")),
                          (product_key, ("expert_counts", "switch_loss_from_sums"))):
        for name in names:
            function = getattr(module, name)

            def counted(*args, _function=function, _name=name, **kwargs):
                calls.append(_name)
                return _function(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("case", ["dropless", "dropping", "product_key"])
def test_routing_statistics_are_computed_only_when_read(monkeypatch, case):
    calls = _count_statistics_calls(monkeypatch)
    overrides = {"dropping": dict(drop_tokens=True, eval_capacity_factor=0.5, min_capacity=1),
                 "product_key": dict(router_type="product_key", num_experts=16, num_experts_per_tok=3,
                                     moe_intermediate_size=1, gated_experts=False)}.get(case, {})
    model = hf_moe.HfMoeForCausalLM(tiny_config(**overrides)).eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad(), hf_moe.record_routing(model) as routings:
        model(ids)
    assert calls == [], "an inference forward computed routing statistics nobody read"
    routing = routings[0]
    num_experts = model.config.num_experts
    assert routing.capacity is not None if case == "dropping" else routing.capacity is None
    counts = [0.0] * num_experts  # the slots that reach an expert, after any dropping
    for expert in routing.top_k_index.reshape(-1).tolist():
        if expert < num_experts:
            counts[expert] += 1
    logits = routing.logits.double()
    if case == "product_key":  # p(i·N + j) = p₁(i)·p₂(j) over N² experts
        halves = logits.view(14, 2, 4).softmax(-1)
        probs = (halves[:, 0, :, None] * halves[:, 1, None, :]).reshape(14, num_experts)
        entropy = -(probs * probs.log()).sum(-1)
        torch.testing.assert_close(routing.token_entropy, entropy.float(), rtol=1e-5, atol=1e-6)
        selection = routing.top_k_index.tolist()
    else:
        probs = logits.softmax(-1)
        assert routing.token_entropy is None  # the entropy metric takes it from probs
        selection = [descending(row)[:2] for row in probs.tolist()]  # the aux loss sees it before dropping
    expected = ref_switch_loss(probs.tolist(), selection, num_experts)
    assert_rel_close(routing.aux_loss, torch.tensor(expected), 1e-5, "aux loss")
    assert routing.tokens_per_expert.tolist() == counts
    assert (sum(counts) < 28) == (case == "dropping")
    assert "expert_counts" in calls and calls.count("expert_counts") <= 2


def skewed_bias_router(**overrides) -> HfMoeRouter:
    router = make_router(num_experts=8, num_experts_per_tok=2, scoring_func="sigmoid", use_expert_bias=True,
                         **overrides).train()
    with torch.no_grad():
        router.weight[:, 0] = torch.linspace(2.0, -2.0, 8)  # inputs with x[0] > 0 prefer the low experts
    return router


def skewed_batch() -> torch.Tensor:
    x = torch.randn(256, H)
    x[:, 0] = x[:, 0].abs() + 1.0
    return x


def test_bias_balancing_reaches_balance_without_touching_the_weights():
    router = skewed_bias_router()
    x = skewed_batch()
    start = router(x).tokens_per_expert
    assert start.max() / start.mean() > 2.0, "the router was not skewed: the test could not have failed"
    router.expert_load = None
    loads = []
    for _ in range(60):
        for _ in range(2):  # two micro-batches per optimizer step
            out = router(skewed_batch())
        loads.append(update_expert_bias(router, rate=0.02)[0])
        if loads[-1].max() / loads[-1].mean() < 1.2:
            break
    assert loads[-1].max() / loads[-1].mean() < 1.2, f"not balanced after {len(loads)} updates: {loads[-1]}"
    assert loads[0].sum() == 2 * 256 * 2  # counts from both micro-batches
    assert router.expert_bias.abs().max() > 0
    out = router(x)
    scores = out.logits.sigmoid()
    expected = scores.gather(1, out.top_k_index)
    assert_rel_close(out.top_k_weights, expected / expected.sum(-1, keepdim=True), 1e-6, "weights from clean scores")
    assert (out.logits.sigmoid() + router.expert_bias).topk(2).indices.tolist() == out.top_k_index.tolist()


def test_bias_update_direction_and_eval_does_not_count():
    router = skewed_bias_router()
    x = skewed_batch()
    router.eval()
    router(x)
    assert router.expert_load is None
    router.train()
    counts = router(x).tokens_per_expert
    update_expert_bias(router, rate=0.5)
    expected = 0.5 * torch.sign(counts.mean() - counts)
    assert torch.equal(router.expert_bias, expected)
    assert router.expert_load is None
    update_expert_bias(router, rate=0.5)  # nothing routed since: no change
    assert torch.equal(router.expert_bias, expected)
    with pytest.raises(ValueError, match="rate=-1"):
        update_expert_bias(router, rate=-1)
    with pytest.raises(ValueError, match="use_expert_bias"):
        update_expert_bias(make_router())
