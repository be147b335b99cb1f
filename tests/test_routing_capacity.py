"""Expert capacity and token dropping: the exact capacity formula, DeepSpeed's priority order and
top2gating renormalisation, padding that takes no capacity, random token selection, and dropped slots that
contribute nothing in every experts backend, each against a float64 reference."""

import math
from fractions import Fraction

import pytest
import torch

import hf_moe
from hf_moe import HfMoeForCausalLM, record_routing
from hf_moe.moe.capacity import drop_over_capacity

from .conftest import assert_rel_close, tiny_config
from .routing_cases import H, assert_routing, descending, make_router, ref_logits, ref_softmax, routed_logits


def ref_priority_keep(index: list[list[int]], capacity: int, num_experts: int) -> list[list[bool]]:
    """DeepSpeed order: every token's first choice, then every token's second choice, ..."""
    load = [0] * num_experts
    keep = [[False] * len(index[0]) for _ in index]
    for j in range(len(index[0])):
        for t, row in enumerate(index):
            if row[j] < num_experts and load[row[j]] < capacity:
                load[row[j]] += 1
                keep[t][j] = True
    return keep


def test_capacity_formula():
    config = tiny_config(num_experts=6, num_experts_per_tok=2, capacity_factor=1.25, eval_capacity_factor=2.0,
                         min_capacity=3)
    assert hf_moe.expert_capacity(config, 20, training=True) == math.ceil(20 * 2 * Fraction("1.25") / 6)
    assert hf_moe.expert_capacity(config, 20, training=False) == math.ceil(20 * 2 * Fraction("2.0") / 6)
    assert hf_moe.expert_capacity(config, 4, training=True) == 3  # min_capacity
    assert hf_moe.expert_capacity(config, 2, training=True) == 2  # never more than the tokens


def test_capacity_is_exact_for_decimal_factors():
    # float maths gives 12 and 56 here: 100·1.1/10 and 200·2·1.1/8 land just above the integers 11 and 55
    assert hf_moe.expert_capacity(tiny_config(num_experts=10, num_experts_per_tok=1, capacity_factor=1.1,
                                              min_capacity=0), 100, training=True) == 11
    assert hf_moe.expert_capacity(tiny_config(num_experts=8, num_experts_per_tok=2, capacity_factor=1.1,
                                              min_capacity=0), 200, training=True) == 55
    factors = ["0.1", "0.3", "0.7", "1.1", "1.2", "1.25", "1.3", "1.7", "2.3", "3.3", "2.675", "0.30000000000000004",
               "0.012345", "1.0000000000000002", "20.5"]
    for experts, top_k in [(3, 1), (6, 2), (8, 2), (10, 1), (10, 3)]:
        for train_factor, eval_factor in zip(factors, reversed(factors)):
            for min_capacity in (0, 4):
                config = tiny_config(num_experts=experts, num_experts_per_tok=top_k, min_capacity=min_capacity,
                                     capacity_factor=float(train_factor), eval_capacity_factor=float(eval_factor))
                for tokens in range(1, 301):
                    for training, factor in ((True, train_factor), (False, eval_factor)):
                        exact = math.ceil(Fraction(tokens * top_k) * Fraction(factor) / experts)
                        expected = min(tokens, max(min_capacity, exact))
                        got = hf_moe.expert_capacity(config, tokens, training=training)
                        assert got == expected, (experts, top_k, factor, min_capacity, tokens, training, got)


def test_exact_capacity_traces_under_torch_compile_with_dynamic_shapes():
    config = tiny_config(num_experts=10, num_experts_per_tok=1, capacity_factor=1.1, min_capacity=0)

    @torch.compile(dynamic=True, fullgraph=True, backend="eager")
    def capacity_buffer(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(hf_moe.expert_capacity(config, x.shape[0], training=True))

    assert [capacity_buffer(torch.ones(t)).shape[0] for t in (100, 37)] == [11, 5]


def test_priority_dropping_matches_the_reference_and_respects_capacity():
    router = make_router(num_experts=4, num_experts_per_tok=2, drop_tokens=True, eval_capacity_factor=0.6,
                         min_capacity=0)
    x = torch.randn(24, H)
    dropless = make_router(num_experts=4, num_experts_per_tok=2)
    dropless.load_state_dict(router.state_dict())
    full = dropless(x)
    out = router(x)
    capacity = math.ceil(24 * 2 * 0.6 / 4)
    assert out.capacity == capacity
    keep = ref_priority_keep(full.top_k_index.tolist(), capacity, 4)
    keep_t = torch.tensor(keep)
    assert not keep_t.all(), "nothing dropped: the test could not have failed"
    assert torch.equal(out.top_k_index, full.top_k_index.masked_fill(~keep_t, 4))
    assert torch.equal(out.top_k_weights, full.top_k_weights.masked_fill(~keep_t, 0.0))
    counts = torch.bincount(out.top_k_index.reshape(-1), minlength=5)[:4]
    assert (counts <= capacity).all() and torch.equal(counts.float(), out.tokens_per_expert)
    assert_rel_close(out.drop_fraction, torch.tensor(1 - keep_t.float().mean().item()), 1e-6, "drop fraction")
    assert_rel_close(out.aux_loss, full.aux_loss, 1e-6, "aux loss sees the selection before dropping")


def ref_deepspeed_top2gating(logits: list[list[float]], capacity_factor: float, min_capacity: int):
    """DeepSpeed 0.19's `top2gating` (deepspeed/moe/sharded_moe.py) with `drop_tokens=True` and no second-expert
    sampling, as a float64 loop: first choice = argmax of the softmax, second = argmax of the rest; capacity
    `max(ceil(T/E · 2f), min_capacity)`; every token's first choice queues before any second choice, in batch
    order; the two gates are divided by the sum of the surviving ones (clamped at float32's eps).
    Returns (capacity, [(expert or None, gate)] * 2 per token)."""
    num_tokens, num_experts = len(logits), len(logits[0])
    capacity = max(math.ceil(num_tokens / num_experts * capacity_factor * 2), min_capacity)
    gates = [ref_softmax(row) for row in logits]
    first = [max(range(num_experts), key=lambda e: (row[e], -e)) for row in gates]
    second = [max((e for e in range(num_experts) if e != i), key=lambda e: (row[e], -e))
              for row, i in zip(logits, first)]
    load = [0] * num_experts
    kept = [[False, False] for _ in range(num_tokens)]
    for slot, choice in enumerate((first, second)):
        for t in range(num_tokens):
            kept[t][slot] = load[choice[t]] < capacity
            load[choice[t]] += 1  # a dropped slot still takes its location, as DeepSpeed's cumsum does
    routes = []
    for t in range(num_tokens):
        g = [gates[t][first[t]] * kept[t][0], gates[t][second[t]] * kept[t][1]]
        denom = max(g[0] + g[1], torch.finfo(torch.float32).eps)
        routes.append([(e if k else None, v / denom) for e, k, v in zip((first[t], second[t]), kept[t], g)])
    return capacity, routes


def test_renormalize_after_drop_is_deepspeed_top2gating():
    """Which slots survive capacity and with which weights, against a float64 re-implementation of DeepSpeed's
    top2gating, on several random batches; the default keeps g/(g₁+g₂) on a survivor instead."""
    router = make_router(num_experts=8, num_experts_per_tok=2, drop_tokens=True, renormalize_after_drop=True,
                         eval_capacity_factor=0.75, min_capacity=0)
    default = make_router(num_experts=8, num_experts_per_tok=2, drop_tokens=True, eval_capacity_factor=0.75,
                          min_capacity=0)
    half_dropped = 0
    for _ in range(5):
        with torch.no_grad():
            router.weight.normal_(0.0, 0.3).add_(torch.randn(8, 1) * 0.05)  # some experts oversubscribed
        default.load_state_dict(router.state_dict())
        x = torch.randn(64, H)
        out, plain = router(x), default(x)
        capacity, routes = ref_deepspeed_top2gating(ref_logits(router, x).tolist(), 0.75, 0)
        assert out.capacity == capacity == 12
        index = [[8 if e is None else e for e, _ in row] for row in routes]
        assert_routing(out, index, [[g for _, g in row] for row in routes], tol=1e-6)
        assert torch.equal(plain.top_k_index, out.top_k_index)
        one_left = (out.top_k_index < 8).sum(-1) == 1
        half_dropped += int(one_left.sum())
        survivor = out.top_k_weights[one_left].sum(-1)
        assert torch.allclose(survivor, torch.ones_like(survivor))
        # the default loses the dropped share: a survivor keeps p/(p₁+p₂) of the float64 top-2 softmax, below 1
        probs = ref_logits(router, x).softmax(-1)
        kept = (probs.gather(-1, out.top_k_index.clamp(max=7)) * (out.top_k_index < 8))[one_left].sum(-1)
        share = kept / probs.topk(2, dim=-1).values.sum(-1)[one_left]
        assert torch.allclose(plain.top_k_weights[one_left].sum(-1).double(), share, atol=1e-5) and (share < 1).all()
    assert half_dropped > 10, "few tokens lost one slot of two: the test could not have failed"


@pytest.mark.parametrize("norm", [True, False])
def test_renormalize_after_drop_keeps_each_tokens_total_weight_at_any_k(norm):
    """k = 3, sigmoid scores, a scaling factor, padding and tokens that lose every slot: the survivors are
    rescaled to the token's total before dropping (float64 loop), gradients stay finite."""
    router = make_router(num_experts=6, num_experts_per_tok=3, scoring_func="sigmoid", norm_topk_prob=norm,
                         routed_scaling_factor=2.0, drop_tokens=True, renormalize_after_drop=True,
                         eval_capacity_factor=0.25, min_capacity=0)
    logits = torch.randn(40, 6)
    logits[:24, :3] += 8.0  # tokens 0-23 pick experts 0-2, 8 first choices each: 9 or more lose all three slots
    logits[torch.arange(24), torch.arange(24) % 3] += 8.0  # far beyond the noise: exactly 8 first choices each
    x = routed_logits(router, logits).requires_grad_()
    mask = torch.ones(40, dtype=torch.bool)
    mask[24:] = torch.rand(16) > 0.3
    out = router(x, mask)
    capacity = math.ceil(40 * 3 * 0.25 / 6)
    chosen, weights = [], []
    for row, real in zip(ref_logits(router, x).tolist(), mask.tolist()):
        scores = [1 / (1 + math.exp(-v)) for v in row]
        top = descending(scores)[:3]
        w = [2.0 * scores[e] / (sum(scores[i] for i in top) if norm else 1.0) for e in top]
        chosen.append(top if real else [6, 6, 6])
        weights.append(w)
    keep = ref_priority_keep(chosen, capacity, 6)
    index, kept_weights, emptied = [], [], 0
    for top, w, k in zip(chosen, weights, keep):
        left = sum(v for v, kk in zip(w, k) if kk)
        index.append([e if kk else 6 for e, kk in zip(top, k)])
        kept_weights.append([v * sum(w) / left if kk else 0.0 for v, kk in zip(w, k)])
        emptied += top[0] < 6 and not any(k)
    assert_routing(out, index, kept_weights, tol=1e-6)
    assert emptied >= 9 and sum(0 < sum(k) < 3 for k in keep) > 5, "the drops did not exercise the rule"
    out.top_k_weights.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(router.weight.grad).all()


def test_padding_takes_no_capacity():
    index = torch.tensor([[0], [0], [0], [1]])
    weights = torch.rand(4, 1)
    mask = torch.tensor([False, True, True, True])
    router = make_router(num_experts=2, num_experts_per_tok=1, drop_tokens=True, capacity_factor=1.0,
                         min_capacity=0)
    logits = torch.tensor([[5.0, 0.0]] * 3 + [[0.0, 5.0]])
    with torch.no_grad():
        router.weight.copy_(torch.eye(2, H))
    out = router(torch.nn.functional.pad(logits, (0, H - 2)), mask)
    assert out.capacity == 2
    assert out.top_k_index[:, 0].tolist() == [2, 0, 0, 1]
    assert out.tokens_per_expert.tolist() == [2.0, 1.0]  # counted after dropping, padding excluded
    assert torch.equal(drop_over_capacity(index, weights, 2, 2)[0][:, 0], torch.tensor([0, 0, 2, 1]))


def test_random_token_selection_drops_at_random_within_capacity():
    index = torch.randint(0, 3, (60, 2))
    index[:, 1] = (index[:, 0] + 1) % 3
    weights = torch.rand(60, 2)
    kept_sets = set()
    for _ in range(4):
        new_index, new_weights = drop_over_capacity(index, weights, 3, capacity=25, random_priority=True)
        counts = torch.bincount(new_index.reshape(-1), minlength=4)[:3]
        assert (counts <= 25).all()
        kept = new_index < 3
        assert torch.equal(new_index[kept], index[kept]) and (new_weights[~kept] == 0).all()
        assert kept.sum() == torch.minimum(torch.bincount(index.reshape(-1), minlength=3), torch.tensor(25)).sum()
        kept_sets.add(tuple(kept.reshape(-1).tolist()))
    assert len(kept_sets) > 1, "random token selection dropped the same slots four times"


def test_dropless_keeps_every_slot():
    out = make_router(num_experts=4, num_experts_per_tok=2)(torch.randn(50, H))
    assert out.capacity is None and (out.top_k_index < 4).all()
    assert out.tokens_per_expert.sum() == 100 and out.drop_fraction == 0


def ref_moe(block, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ over kept slots of weight · expert(x[t]) in float64; sentinel slots add nothing."""
    experts = block.experts
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, w in zip(index[t].tolist(), weights[t].tolist()):
            if e == experts.num_experts:
                continue
            gate, up = (experts.gate_up_proj[e].double() @ x[t].double()).chunk(2)
            out[t] += w * (experts.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("impl", ["eager", "hf_moe_grouped", "grouped_mm", "hf_moe_capacity"])
@pytest.mark.parametrize("router_type", ["topk", "expert_choice"])
def test_dropped_slots_contribute_nothing(impl, router_type):
    extra = dict(drop_tokens=True, capacity_factor=0.5) if router_type == "topk" else dict(capacity_factor=0.5)
    model = HfMoeForCausalLM(tiny_config(num_hidden_layers=1, router_type=router_type, min_capacity=0, **extra))
    model.set_experts_implementation(impl)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 7, H)
    with torch.no_grad():
        with record_routing(block) as routings:
            out = block(x)
        routing = routings[0]
    assert (routing.top_k_index == 6).any()
    expected = ref_moe(block, x.view(-1, H), routing.top_k_index, routing.top_k_weights)
    assert_rel_close(out.view(-1, H), expected, 1e-5, impl)


def _logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_capacity_padded_path_equals_the_dropless_path_when_nothing_drops(drop_tokens):
    # capacity_factor = E/k makes the capacity the number of tokens: nothing can drop
    model = HfMoeForCausalLM(tiny_config(num_experts=6, num_experts_per_tok=2, drop_tokens=drop_tokens,
                                         capacity_factor=3.0)).train()
    ids = torch.randint(0, 97, (3, 8))
    model.set_experts_implementation("hf_moe_grouped")
    ref_logits_, ref_grads = _logits_and_grads(model, ids)
    model.set_experts_implementation("hf_moe_capacity")
    logits, grads = _logits_and_grads(model, ids)
    assert_rel_close(logits, ref_logits_, 1e-5, "logits")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_rel_close(grads[name], ref_grads[name], 1e-5, name)
