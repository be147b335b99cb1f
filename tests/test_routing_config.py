"""The routing fields of `HfMoeConfig`: bad values are refused with a clear error, the defaults are the
foundation behaviour."""


import pytest

from hf_moe import HfMoeConfig

from .conftest import tiny_config

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
