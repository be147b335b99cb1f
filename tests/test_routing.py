"""Routing strategies, capacity and dropping, noise, losses, aux-loss-free balancing and router metrics, each
checked against a straightforward float64 reference written here (or transformers' own loss function)."""

import math
from fractions import Fraction

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import hf_moe
from hf_moe import (
    HfMoeConfig,
    HfMoeForCausalLM,
    HfMoeRouter,
    load_balancing_loss,
    record_routing,
    register_router,
    router_metrics,
    router_z_loss,
    sequence_load_balancing_loss,
    update_expert_bias,
)
from hf_moe.moe.capacity import drop_over_capacity
from hf_moe.moe.router.registry import ROUTER_CLASSES, build_router

from .conftest import assert_cached_greedy_equals_full_forward, assert_rel_close, rel_err, tiny_config

H = 32


def make_router(**overrides) -> HfMoeRouter:
    router = build_router(tiny_config(**overrides), layer_idx=0)
    if router.weight is not None:
        with torch.no_grad():  # logits of std ≈ 1.7: decisive routing, no sigmoid saturating to 1.0 in float32
            router.weight.normal_(0.0, 0.3)
    return router.eval()


def ref_logits(router: HfMoeRouter, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ router.weight.detach().double().T


def ref_softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def descending(values: list[float], allowed=None) -> list[int]:
    candidates = range(len(values)) if allowed is None else allowed
    return sorted(candidates, key=lambda e: -values[e])


def assert_routing(out, index: list[list[int]], weights: list[list[float]], tol: float = 1e-5) -> None:
    assert out.top_k_index.tolist() == index
    assert_rel_close(out.top_k_weights, torch.tensor(weights, dtype=torch.float64), tol, "weights")


# --------------------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("topk_before_softmax", [False, True])
def test_softmax_topk_matches_reference(norm, topk_before_softmax):
    router = make_router(num_experts=7, num_experts_per_tok=3, norm_topk_prob=norm,
                         topk_before_softmax=topk_before_softmax)
    x = torch.randn(13, H)
    index, weights = [], []
    for row in ref_logits(router, x).tolist():
        probs = ref_softmax(row)
        chosen = descending(probs)[:3]
        if topk_before_softmax:
            w = ref_softmax([row[e] for e in chosen])
        else:
            w = [probs[e] for e in chosen]
            if norm:
                w = [v / sum(w) for v in w]
        index.append(chosen)
        weights.append(w)
    assert_routing(router(x), index, weights)


@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_scores_with_renormalisation_and_scaling(norm):
    router = make_router(num_experts=8, num_experts_per_tok=2, scoring_func="sigmoid", norm_topk_prob=norm,
                         routed_scaling_factor=2.5)
    x = torch.randn(11, H)
    index, weights = [], []
    for row in ref_logits(router, x).tolist():
        scores = [1 / (1 + math.exp(-v)) for v in row]
        chosen = descending(scores)[:2]
        w = [scores[e] for e in chosen]
        if norm:
            w = [v / sum(w) for v in w]
        index.append(chosen)
        weights.append([2.5 * v for v in w])
    assert_routing(router(x), index, weights)


def test_group_limited_routing_picks_groups_by_top2_sum_and_never_leaves_them():
    router = make_router(num_experts=16, num_experts_per_tok=4, scoring_func="sigmoid", n_group=4, topk_group=2)
    x = torch.randn(40, H)
    out = router(x)
    index, weights, differs_from_plain_topk = [], [], False
    for row in ref_logits(router, x).tolist():
        scores = [1 / (1 + math.exp(-v)) for v in row]
        group_score = [sum(sorted(scores[4 * g: 4 * g + 4], reverse=True)[:2]) for g in range(4)]
        groups = descending(group_score)[:2]
        allowed = [e for g in groups for e in range(4 * g, 4 * g + 4)]
        chosen = descending(scores, allowed)[:4]
        w = [scores[e] for e in chosen]
        index.append(chosen)
        weights.append([v / sum(w) for v in w])
        differs_from_plain_topk |= set(chosen) != set(descending(scores)[:4])
    assert_routing(out, index, weights)
    picked_groups = out.top_k_index // 4
    assert all(len(set(row)) <= 2 for row in picked_groups.tolist())
    assert differs_from_plain_topk, "the group limit never mattered: the test could not have failed"


def ref_group_limited(row: list[float], scoring_func: str, n_group: int, topk_group: int, top_k: int,
                      group_score: str) -> tuple[list[int], list[float]]:
    """One token's group-limited routing in float64, a plain loop over its groups: score each group (its best
    score, or the sum of its two best), keep the `topk_group` best groups (ties: lower group), then the `top_k`
    best experts inside them (ties: lower expert), weights renormalised."""
    scores = ref_softmax(row) if scoring_func == "softmax" else [1 / (1 + math.exp(-v)) for v in row]
    size = len(scores) // n_group
    group_scores = []
    for g in range(n_group):
        members = sorted(scores[g * size: (g + 1) * size], reverse=True)
        group_scores.append(members[0] if group_score == "max" else sum(members[:2]))
    groups = sorted(range(n_group), key=lambda g: (-group_scores[g], g))[:topk_group]
    allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
    chosen = sorted(allowed, key=lambda e: (-scores[e], e))[:top_k]
    w = [scores[e] for e in chosen]
    return chosen, [v / sum(w) for v in w]


def routed_logits(router: HfMoeRouter, logits: torch.Tensor) -> torch.Tensor:
    """Make the router's logits exactly `logits` (identity gate over the first E input features)."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts, H))
    return torch.nn.functional.pad(logits, (0, H - router.num_experts))


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_group_score_rule_matches_a_float64_loop_over_tokens_and_groups(scoring_func, group_score):
    other = "top2_sum" if group_score == "max" else "max"
    router = make_router(num_experts=16, num_experts_per_tok=3, scoring_func=scoring_func, n_group=4, topk_group=2,
                         group_score=group_score)
    x = torch.randn(200, H)
    index, weights, differs_from_other_rule = [], [], False
    for row in ref_logits(router, x).tolist():
        chosen, w = ref_group_limited(row, scoring_func, 4, 2, 3, group_score)
        index.append(chosen)
        weights.append(w)
        differs_from_other_rule |= chosen != ref_group_limited(row, scoring_func, 4, 2, 3, other)[0]
    assert_routing(router(x), index, weights)
    assert differs_from_other_rule, "both group rules chose alike: the test could not have failed"


@pytest.mark.parametrize("scoring_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_tied_groups_go_to_the_lower_group_under_either_rule(scoring_func, group_score):
    """Logits from four values (no two pairs of them sum alike), so groups and experts tie exactly and often;
    the router must break every tie as the reference does: lower group, then lower expert."""
    router = make_router(num_experts=12, num_experts_per_tok=3, scoring_func=scoring_func, n_group=4, topk_group=2,
                         group_score=group_score)
    values = torch.tensor([0.25, 0.75, 1.5, 2.5])
    logits = values[torch.randint(0, 4, (300, 12))]
    logits[0] = torch.tensor([2.5, 0.25, 0.25, 2.5, 0.75, 0.25, 2.5, 0.75, 0.25, 0.25, 0.25, 0.25])
    index, weights, boundary_ties = [], [], 0
    for row in logits.double().tolist():
        chosen, w = ref_group_limited(row, scoring_func, 4, 2, 3, group_score)
        index.append(chosen)
        weights.append(w)
        by_group = [max(row[3 * g: 3 * g + 3]) if group_score == "max" else sum(sorted(row[3 * g: 3 * g + 3])[1:])
                    for g in range(4)]
        ranked = sorted(by_group, reverse=True)
        boundary_ties += ranked[1] == ranked[2]  # the second kept group ties with the first dropped one
    assert_routing(router(routed_logits(router, logits)), index, weights)
    assert boundary_ties > 10, "too few tied groups at the cut: the test could not have failed"
    # token 0: groups 0, 1, 2 all have best score 2.5 (max keeps 0 and 1); their top-2 sums are 2.75, 3.25, 3.25
    assert index[0] == ([0, 3, 4] if group_score == "max" else [3, 6, 4])


@pytest.mark.parametrize("norm", [False, True])
def test_switch_top1_weight_is_the_probability_or_one(norm):
    router = make_router(router_type="switch", num_experts_per_tok=1, norm_topk_prob=norm)
    assert type(router).__name__ == "SwitchRouter"
    x = torch.randn(10, H)
    index, weights = [], []
    for row in ref_logits(router, x).tolist():
        probs = ref_softmax(row)
        best = descending(probs)[0]
        index.append([best])
        weights.append([1.0 if norm else probs[best]])
    assert_routing(router(x), index, weights)


def test_expert_choice_gives_every_expert_exactly_capacity_tokens():
    router = make_router(router_type="expert_choice", num_experts=6, num_experts_per_tok=2, capacity_factor=1.5)
    router.train()  # training uses capacity_factor (eval: eval_capacity_factor)
    x = torch.randn(16, H)
    out = router(x)
    capacity = math.ceil(16 * 2 * 1.5 / 6)
    assert out.capacity == capacity
    assert out.top_k_index.shape == (16, 6)
    assert out.tokens_per_expert.tolist() == [capacity] * 6
    probs = [ref_softmax(row) for row in ref_logits(router, x).tolist()]
    expected_index = [[6] * 6 for _ in range(16)]
    expected_weights = [[0.0] * 6 for _ in range(16)]
    for e in range(6):
        for t in sorted(range(16), key=lambda t: -probs[t][e])[:capacity]:
            expected_index[t][e] = e
            expected_weights[t][e] = probs[t][e]
    assert_routing(out, expected_index, expected_weights)


def test_expert_choice_skips_padding_and_refuses_generate():
    router = make_router(router_type="expert_choice", num_experts=4, num_experts_per_tok=2, eval_capacity_factor=2.0)
    mask = torch.tensor([True] * 3 + [False] * 5)
    out = router(torch.randn(8, H), mask)
    assert out.capacity == 8  # more than the 3 real tokens: the rest of every column stays unassigned
    assert (out.top_k_index[~mask] == 4).all() and (out.top_k_weights[~mask] == 0).all()
    assert (out.top_k_index[mask] < 4).all()
    model = HfMoeForCausalLM(tiny_config(router_type="expert_choice")).eval()
    with pytest.raises(ValueError, match="expert_choice.*not causal"):
        model.generate(torch.randint(0, 97, (1, 4)), max_new_tokens=2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("scoring_func,experts,top_k", [("softmax", 6, 2), ("sigmoid", 8, 4), ("softmax", 64, 4)])
def test_tied_scores_go_to_the_lower_expert_so_virtual_groups_stay_whole(device, scoring_func, experts, top_k):
    """Upcycled virtual groups: identical router rows per group of 2, and groups that share rows with other groups,
    so scores tie within and across groups; the chosen experts must be whole groups, lower indices first (the
    order Python's stable sort gives), on CPU, on CUDA and in the fused kernel (64 experts on CUDA)."""
    router = make_router(num_experts=experts, num_experts_per_tok=top_k, scoring_func=scoring_func,
                         norm_topk_prob=True).to(device)
    groups = experts // 2
    with torch.no_grad():
        distinct = router.weight[: groups // 2 + 1].clone()  # fewer distinct rows than groups: groups tie too
        pick = torch.randint(0, distinct.shape[0], (groups,))
        router.weight.copy_(distinct[pick].repeat_interleave(2, dim=0))
    out = router(torch.randn(300, H, device=device))
    scores = out.probs if scoring_func == "softmax" else out.logits.sigmoid()  # what the router ranked
    for row, chosen in zip(scores.tolist(), out.top_k_index.tolist()):
        want = sorted(range(experts), key=lambda e: (-row[e], e))[:top_k]
        assert sorted(chosen) == sorted(want), (row, chosen)
    chosen = out.top_k_index.sort(dim=-1).values
    assert torch.equal(chosen[:, 0::2] // 2, chosen[:, 1::2] // 2), "a virtual group was split"


def test_hash_routing_is_deterministic_and_depends_on_the_token_id():
    config = tiny_config(router_type="hash", num_experts=8, num_experts_per_tok=2, hash_seed=3)
    a, b = build_router(config, 0), build_router(config, 0)
    ids = torch.randint(0, 97, (30,))
    out = a(torch.randn(30, H), input_ids=ids)
    assert torch.equal(out.top_k_index, b(torch.randn(30, H), input_ids=ids).top_k_index)
    assert torch.equal(out.top_k_index, a.hash_table[ids])
    assert (out.top_k_weights == 0.5).all()
    assert all(len(set(row)) == 2 for row in a.hash_table.tolist())  # k distinct experts per id
    assert len({tuple(row) for row in a.hash_table.tolist()}) > 10  # different ids, different experts
    assert not torch.equal(a.hash_table, build_router(config, 1).hash_table)  # layers differ
    other_seed = build_router(tiny_config(router_type="hash", num_experts=8, hash_seed=4), 0)
    assert not torch.equal(a.hash_table, other_seed.hash_table)
    with pytest.raises(ValueError, match="input_ids"):
        a(torch.randn(3, H))


def test_fake_balanced_gate_is_uniform_without_noise_and_random_with_it():
    balanced = make_router(router_type="fake_balanced", num_experts=6, num_experts_per_tok=2)
    out = balanced(torch.randn(12, H))
    assert out.tokens_per_expert.tolist() == [4.0] * 6
    assert (out.top_k_weights == 0.5).all()
    noisy = make_router(router_type="fake_balanced", num_experts=6, num_experts_per_tok=2, fake_gate_noise=1.0)
    first, second = noisy(torch.randn(64, H)), noisy(torch.randn(64, H))
    assert not torch.equal(first.top_k_index, second.top_k_index)
    assert_rel_close(first.top_k_weights.sum(-1), torch.ones(64), 1e-6, "weights sum to 1")
    assert (first.top_k_index[:, 0] != first.top_k_index[:, 1]).all()


def test_custom_router_plugs_in_by_name(tmp_path):
    @register_router("test_reverse_topk")
    class ReverseTopK(HfMoeRouter):
        def select(self, logits, scores, input_ids=None):
            index = (-scores).topk(self.top_k, dim=-1).indices  # the least likely experts
            return index, scores.gather(1, index)

    try:
        model = HfMoeForCausalLM(tiny_config(router_type="test_reverse_topk")).eval()
        assert isinstance(model.model.layers[0].mlp.router, ReverseTopK)
        ids = torch.randint(0, 97, (2, 5))
        out = model(ids, output_router_logits=True)
        worst = out.router_logits[0].topk(2, dim=-1, largest=False).indices
        assert torch.equal(out.router_outputs[0].top_k_index, worst)
        model.save_pretrained(tmp_path)
        assert type(HfMoeForCausalLM.from_pretrained(tmp_path).model.layers[0].mlp.router) is ReverseTopK
    finally:
        ROUTER_CLASSES.pop("test_reverse_topk")
    with pytest.raises(ValueError, match="router_type.*register_router"):
        tiny_config(router_type="test_reverse_topk")


# --------------------------------------------------------------------------------------- capacity, dropping


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
    factors = ["0.1", "0.3", "0.7", "1.1", "1.2", "1.25", "1.3", "1.7", "2.3", "3.3"]
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
        assert (plain.top_k_weights[one_left].sum(-1) < 1 - 1e-3).all()  # the default loses the dropped share
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


# --------------------------------------------------------------------------------------- logits precision

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype, grad_tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_half_precision_router_gives_float32_accurate_logits_and_grads_in_its_dtype(device, dtype, grad_tol):
    hidden, experts, tokens = 512, 16, 300
    router = make_router(hidden_size=hidden, num_experts=experts).to(device=device, dtype=dtype)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    logits = router.compute_logits(x)
    weight = router.weight.detach().double()
    assert logits.dtype == torch.float32
    # float32 accumulation of the exact half products: far tighter than a half-precision result (~4e-3) could be
    assert_rel_close(logits, x.detach().double() @ weight.T, 1e-5, "logits")
    grad_logits = torch.randn(tokens, experts, device=device)
    (logits * grad_logits).sum().backward()
    assert x.grad.dtype == dtype and router.weight.grad.dtype == dtype
    assert_rel_close(x.grad, grad_logits.double() @ weight, grad_tol, "x.grad")
    assert_rel_close(router.weight.grad, grad_logits.double().T @ x.detach().double(), grad_tol, "weight.grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_router_logits_and_grads_are_a_plain_linear_layer(dtype):
    router = make_router(num_experts=8).to(dtype)
    x = torch.randn(50, H, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    weight_ref = router.weight.detach().clone().requires_grad_(True)
    grad_logits = torch.randn(50, 8, dtype=dtype)
    logits, ref = router.compute_logits(x), torch.nn.functional.linear(x_ref, weight_ref)
    assert logits.dtype == dtype and torch.equal(logits, ref)
    (logits * grad_logits).sum().backward()
    (ref * grad_logits).sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(router.weight.grad, weight_ref.grad)


# --------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("noise", [dict(router_jitter_noise=0.2), dict(router_gumbel_noise=True)])
def test_noise_only_in_training(noise):
    noisy = make_router(num_experts=8, num_experts_per_tok=2, **noise)
    clean = make_router(num_experts=8, num_experts_per_tok=2)
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(64, H)
    eval_a, eval_b, ref = noisy(x), noisy(x), clean(x)
    assert torch.equal(eval_a.top_k_index, ref.top_k_index) and torch.equal(eval_b.top_k_index, ref.top_k_index)
    assert torch.equal(eval_a.top_k_weights, ref.top_k_weights)
    noisy.train()
    train_a, train_b = noisy(x), noisy(x)
    assert not torch.equal(train_a.top_k_index, train_b.top_k_index)
    if "router_gumbel_noise" in noise:  # Gumbel changes the selection only: weights are the clean scores
        probs = ref.probs
        expected = probs.gather(1, train_a.top_k_index)
        assert_rel_close(train_a.top_k_weights, expected / expected.sum(-1, keepdim=True), 1e-6, "weights")
    else:
        assert not torch.equal(train_a.logits, ref.logits)


# --------------------------------------------------------------------------------------- losses


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


# --------------------------------------------------------------------------------------- aux-loss-free balancing


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


# --------------------------------------------------------------------------------------- full model


MODEL_CASES = {
    "sigmoid_groups_bias": dict(scoring_func="sigmoid", routed_scaling_factor=2.0, n_group=3, topk_group=2,
                                use_expert_bias=True, router_aux_loss_type="sequence"),
    "switch_gumbel_drop": dict(router_type="switch", num_experts_per_tok=1, norm_topk_prob=False,
                               router_gumbel_noise=True, drop_tokens=True, capacity_factor=0.7, use_rts=True),
    "expert_choice": dict(router_type="expert_choice", router_jitter_noise=0.1),
    "hash": dict(router_type="hash", router_aux_loss_type="none"),
    "fake_balanced": dict(router_type="fake_balanced", fake_gate_noise=0.5),
}


@pytest.mark.parametrize("case", MODEL_CASES, ids=list(MODEL_CASES))
def test_full_model_trains_reports_metrics_and_survives_save_load(case, tmp_path):
    config = tiny_config(**MODEL_CASES[case])
    model = HfMoeForCausalLM(config).train()
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = model(ids, attention_mask=mask, labels=ids, output_router_metrics=True)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    router = model.model.layers[0].mlp.router
    if router.weight is not None:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    metrics = router_metrics(out)
    assert len(metrics) == 2 and len(metrics[0]["tokens_per_expert"]) == 6
    for layer in metrics:
        counts = torch.tensor(layer["tokens_per_expert"])
        assert layer["experts_used_fraction"] == pytest.approx((counts > 0).float().mean().item())
        assert layer["max_over_mean_load"] == pytest.approx((counts.max() / counts.mean()).item(), rel=1e-6)
        assert 0 <= layer["drop_fraction"] <= 1 and 0 <= layer["routing_entropy"] <= math.log(6) + 1e-5
    if case == "sigmoid_groups_bias":
        update_expert_bias(model)
        assert model.model.layers[0].mlp.router.expert_bias.abs().max() == pytest.approx(0.001)

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = HfMoeForCausalLM.from_pretrained(tmp_path).eval()
    assert {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert torch.equal(state[name], loaded_state[name]), name
    if case != "fake_balanced":  # the fake gate is random on purpose
        with torch.no_grad():  # equal weights, but loaded ones need not be 64-byte aligned: BLAS may round otherwise
            want, got = model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_router_metrics_equal_a_direct_computation():
    model = HfMoeForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True)
    metrics = router_metrics(out)
    assert metrics == router_metrics(out.router_outputs)
    real = mask.reshape(-1).bool()
    for layer, logits in zip(metrics, out.router_logits):
        probs = logits[real].double().softmax(-1)
        entropy = -(probs * probs.log()).sum(-1).mean().item()
        assert layer["routing_entropy"] == pytest.approx(entropy, rel=1e-5)
        counts = torch.bincount(probs.topk(2).indices.reshape(-1), minlength=6).double()
        assert layer["tokens_per_expert"] == counts.tolist()
        assert sum(layer["tokens_per_expert"]) == 2 * real.sum().item()
    with pytest.raises(ValueError, match="output_router_metrics"):
        router_metrics(model(ids))
    assert model(ids).router_metrics is None


def test_cached_generation_still_matches_the_full_forward_for_causal_routers():
    model = HfMoeForCausalLM(tiny_config(router_type="hash", scoring_func="sigmoid")).eval()
    ids = torch.randint(0, 97, (2, 4))
    assert_cached_greedy_equals_full_forward(model, ids, new_tokens=5)


# --------------------------------------------------------------------------------------- config


BAD_ROUTING = [
    (dict(router_type="nope"), "router_type", "register_router"),
    (dict(scoring_func="relu"), "scoring_func", "softmax"),
    (dict(router_aux_loss_type="gshard"), "router_aux_loss_type", "switch"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor", "positive finite"),
    (dict(capacity_factor=-1.0), "capacity_factor", "positive finite"),
    (dict(eval_capacity_factor=float("inf")), "eval_capacity_factor", "positive finite"),
    (dict(min_capacity=-1), "min_capacity", "integer >= 0"),
    (dict(router_jitter_noise=1.5), "router_jitter_noise", "[0, 1)"),
    (dict(fake_gate_noise=2.0), "fake_gate_noise", "[0, 1]"),
    (dict(hash_seed=-3), "hash_seed", "integer >= 0"),
    (dict(expert_bias_update_rate=-0.1), "expert_bias_update_rate", ">= 0"),
    (dict(drop_tokens="yes"), "drop_tokens", "True or False"),
    (dict(router_type="switch"), "num_experts_per_tok", "router_type='switch'"),
    (dict(topk_before_softmax=True, scoring_func="sigmoid"), "topk_before_softmax", "softmax"),
    (dict(n_group=2), "topk_group", "set together with n_group"),
    (dict(n_group=4, topk_group=2), "n_group", "divisor of num_experts"),
    (dict(n_group=3, topk_group=4), "topk_group", "at most n_group"),
    (dict(n_group=6, topk_group=1), "topk_group", "enough groups"),
    (dict(n_group=3, topk_group=1, router_type="expert_choice"), "n_group", "router_type='topk'"),
    (dict(n_group=3, topk_group=1, group_score="sum"), "group_score", "one of ('top2_sum', 'max')"),
    (dict(group_score="max"), "group_score", "unless n_group is set"),
    (dict(router_type="hash", router_gumbel_noise=True), "router_gumbel_noise", "no learned router"),
    (dict(router_type="expert_choice", drop_tokens=True), "drop_tokens", "expert_choice"),
    (dict(use_rts=True), "use_rts", "drop_tokens=True"),
    (dict(renormalize_after_drop=True), "renormalize_after_drop", "drop_tokens=True"),
    (dict(drop_tokens=True, renormalize_after_drop=1), "renormalize_after_drop", "True or False"),
    (dict(router_type="hash", use_expert_bias=True), "use_expert_bias", "'topk' or 'switch'"),
]


@pytest.mark.parametrize("overrides,field,expected", BAD_ROUTING, ids=[b[1] + "-" + b[2][:12] for b in BAD_ROUTING])
def test_bad_routing_field_is_refused_with_a_clear_error(overrides, field, expected):
    with pytest.raises(ValueError) as info:
        tiny_config(**overrides)
    assert f"HfMoeConfig.{field}=" in str(info.value) and expected in str(info.value)


def test_routing_defaults_are_the_foundation_behaviour():
    config = HfMoeConfig()
    assert (config.router_type, config.scoring_func, config.drop_tokens, config.router_aux_loss_type) == (
        "topk", "softmax", False, "switch")
    assert not config.use_expert_bias and config.router_jitter_noise == 0 and not config.router_gumbel_noise


# --------------------------------------------------------------------------------------- fused softmax top-k


def test_fused_softmax_top_k_serves_the_plain_softmax_router_only(monkeypatch):
    """Which routers take the fused softmax → top-k kernel (decided on the host from flags and types). Checked with
    a stand-in for CUDA float32 logits; the kernel itself is tested on the GPU."""
    from hf_moe.moe import kernels
    from hf_moe.moe.router.topk import FUSED_TOP_K_MIN_EXPERTS

    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    cuda_logits = type("CudaLogits", (), {"is_cuda": True, "dtype": torch.float32})()

    class CustomSelect(HfMoeRouter):
        def select(self, logits, scores, input_ids=None):
            return super().select(logits, scores, input_ids)

    many = FUSED_TOP_K_MIN_EXPERTS
    assert make_router(num_experts=many).fuses_softmax_top_k(cuda_logits)
    assert not make_router(num_experts=many - 1).fuses_softmax_top_k(cuda_logits)
    switch = make_router(router_type="switch", num_experts_per_tok=1, num_experts=many)
    assert switch.fuses_softmax_top_k(cuda_logits)
    noisy = make_router(router_gumbel_noise=True, num_experts=many)
    assert noisy.fuses_softmax_top_k(cuda_logits)  # eval: no noise
    assert not noisy.train().fuses_softmax_top_k(cuda_logits)
    for overrides in (
        dict(scoring_func="sigmoid"), dict(use_expert_bias=True), dict(n_group=2, topk_group=1),
        dict(topk_before_softmax=True),
    ):
        assert not make_router(num_experts=many, **overrides).fuses_softmax_top_k(cuda_logits), overrides
    assert not CustomSelect(tiny_config(num_experts=many), layer_idx=0).fuses_softmax_top_k(cuda_logits)
    assert not make_router(num_experts=many).fuses_softmax_top_k(torch.zeros(2, many))  # CPU
    double = type("CudaLogits", (), {"is_cuda": True, "dtype": torch.float64})()
    assert not make_router(num_experts=many).fuses_softmax_top_k(double)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # traced as the ops hf_moe::softmax_top_k*
    assert make_router(num_experts=many).fuses_softmax_top_k(cuda_logits)


@requires_cuda
@pytest.mark.parametrize("experts,top_k", [(8, 2), (60, 4), (128, 8), (256, 8), (16, 1), (4, 4)])
@pytest.mark.parametrize("norm,scaling", [(True, 1.0), (False, 1.0), (True, 2.5)])
@pytest.mark.parametrize("aux_loss", ["switch", "sequence"])
def test_cuda_fused_softmax_top_k_equals_the_torch_ops(monkeypatch, experts, top_k, norm, scaling, aux_loss):
    """The fused kernel against the same router on torch's softmax/top-k ops: same experts, probabilities and
    weights, and the same gradients of the logits through the weights, the aux loss and the z-loss; 333 tokens
    (not a multiple of the kernel's token block) of a bf16 model in training."""
    config = tiny_config(
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=norm, routed_scaling_factor=scaling,
        router_aux_loss_type=aux_loss, hidden_size=64,
    )
    router = build_router(config, layer_idx=0).to(device="cuda", dtype=torch.bfloat16).train()
    with torch.no_grad():
        router.weight.normal_(0.0, 0.3)
    x = torch.randn(333, 64, device="cuda", dtype=torch.bfloat16)
    probe = torch.randn(333, top_k, device="cuda")

    def run(fused: bool):
        monkeypatch.setattr(HfMoeRouter, "fuses_softmax_top_k", lambda self, logits: fused)
        xg = x.clone().requires_grad_(True)
        router.zero_grad(set_to_none=True)
        out = router(xg, sequence_length=111)
        loss = (out.top_k_weights.float() * probe).sum() + out.aux_loss + out.z_loss
        loss.backward()
        return out, xg.grad.float(), router.weight.grad.float()

    fused_out, fused_dx, fused_dw = run(True)
    torch_out, torch_dx, torch_dw = run(False)
    assert torch.equal(fused_out.top_k_index, torch_out.top_k_index)
    assert torch.equal(fused_out.tokens_per_expert, torch_out.tokens_per_expert)
    torch.testing.assert_close(fused_out.probs, torch_out.probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_out.top_k_weights.float(), torch_out.top_k_weights.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(fused_out.aux_loss, torch_out.aux_loss, rtol=1e-5, atol=1e-6)
    assert rel_err(fused_dx, torch_dx) < 1e-2 and rel_err(fused_dw, torch_dw) < 1e-2


@requires_cuda
def test_cuda_fused_softmax_top_k_float32_against_float64_and_ties():
    """float32 logits against a float64 softmax/top-k; exactly tied probabilities go to the lower expert."""
    from hf_moe.moe.kernels.softmax_top_k import softmax_top_k

    for top_k, norm in ((1, True), (1, False), (3, True), (8, False)):
        logits = (torch.randn(1000, 64, device="cuda") * 2).requires_grad_(True)
        probs, index, weights = softmax_top_k(logits, top_k, norm)
        ref = logits.detach().double().requires_grad_(True)
        ref_probs = ref.softmax(-1)
        ref_values, ref_index = ref_probs.topk(top_k, dim=-1)
        ref_weights = ref_values / ref_values.sum(-1, keepdim=True) if norm else ref_values
        assert torch.equal(index, ref_index)
        assert rel_err(probs, ref_probs) < 1e-5 and rel_err(weights, ref_weights) < 1e-5
        probe = torch.randn(1000, top_k, device="cuda", dtype=torch.float64)
        probe_probs = torch.randn(1000, 64, device="cuda", dtype=torch.float64)  # k = 1 renormalised: weights ≡ 1
        ((weights.double() * probe).sum() + (probs.double() * probe_probs).sum()).backward()
        ((ref_weights * probe).sum() + (ref_probs * probe_probs).sum()).backward()
        assert rel_err(logits.grad, ref.grad) < 1e-4, (top_k, norm)
    tied = torch.zeros(4, 16, device="cuda")
    tied[:, [3, 7, 11]] = 5.0
    _, index, weights = softmax_top_k(tied, 2, True)
    assert index.tolist() == [[3, 7]] * 4
    torch.testing.assert_close(weights, torch.full((4, 2), 0.5, device="cuda"))
