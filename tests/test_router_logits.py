"""The router's logits: float32-accurate in half precision (with gradients in the router's dtype), a plain
linear layer in full precision, and jitter or Gumbel noise only in training."""


import pytest
import torch

from .conftest import assert_rel_close, requires_cuda
from .routing_cases import H, make_router


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
