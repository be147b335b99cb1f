"""Top-k routing against a float64 reference: softmax and sigmoid scores, renormalisation and scaling,
group-limited routing under both group-score rules, the switch (top-1) router, and the tie rules (lower group,
then lower expert) that keep upcycled virtual groups whole."""

import math

import pytest
import torch

from .routing_cases import H, assert_routing, descending, make_router, ref_logits, ref_softmax, routed_logits


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
