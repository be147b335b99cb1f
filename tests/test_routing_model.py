"""Routing inside the full model: every router type trains, reports metrics that equal a direct
computation and survives save/load; cached generation matches the full forward for causal routers."""

import math

import pytest
import torch

from hf_moe import HfMoeForCausalLM, router_metrics, update_expert_bias

from .conftest import assert_cached_greedy_equals_full_forward, tiny_config

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
