"""The routers besides top-k: expert choice (every expert takes exactly `capacity` tokens), hash routing,
the fake-balanced gate, and a custom router registered by name."""

import math

import pytest
import torch

from hf_moe import HfMoeForCausalLM, HfMoeRouter, register_router
from hf_moe.moe.router.registry import ROUTER_CLASSES, build_router

from .conftest import assert_rel_close, tiny_config
from .routing_cases import H, assert_routing, make_router, ref_logits, ref_softmax


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
