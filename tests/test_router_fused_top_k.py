"""The fused softmax → top-k router kernel: which routers take it (decided on the host, checked on CPU),
and on CUDA its experts, probabilities, weights and gradients against torch's ops and a float64 reference."""


import pytest
import torch

from hf_moe import HfMoeRouter
from hf_moe.moe.router.registry import build_router

from .conftest import rel_err, requires_cuda, tiny_config
from .routing_cases import make_router


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
