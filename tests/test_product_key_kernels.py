"""The product-key Triton kernels against float64 maths: the two-half top-k + merge against brute force over all
N² pairs (float64 sums, ties included), the singleton experts' forward and backward against a float64 einsum,
determinism, no host sync, the whole block on CUDA bf16 against the float64 loop of `test_product_key`,
torch.compile and opcheck (the table gradients' runs and segments: `test_product_key_tables`).

Runs on a CUDA device; on the CPU only under Triton's interpreter (`TRITON_INTERPRET=1` with Triton installed), and
skips otherwise (the CI suite has no Triton).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not (CUDA or INTERPRETED),
                                reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

ACTS = {"silu": F.silu, "relu": torch.relu, "relu2": lambda h: torch.relu(h) ** 2}


def _pairs(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection kernel's `(experts, keys)` on the CPU, its key positions (`i`, `N + j`) checked against its
    experts `i·N + j` and its scores against the float32 sum of the inputs at those positions."""
    from hf_moe.moe.kernels.product_key_top_k import product_key_pairs

    n = log_probs.shape[-1]
    experts, keys, scores = (t.cpu() for t in product_key_pairs(log_probs.to(DEVICE), k))
    assert keys.shape == (*experts.shape[:-1], 2, k) and scores.shape == experts.shape
    assert ((keys[..., 0, :] < n) & (keys[..., 1, :] >= n)).all()
    assert torch.equal(keys[..., 0, :] * n + keys[..., 1, :] - n, experts)
    rows = log_probs.flatten(-2)
    want = rows.gather(-1, keys[..., 0, :]) + rows.gather(-1, keys[..., 1, :])
    assert torch.equal(scores, want)
    return experts, keys


@pytest.mark.parametrize("n,k,levels", [(5, 3, 3), (6, 8, 2), (4, 16, 2), (16, 8, 1000), (64, 64, 1000),
                                          (5, 1, 2), (7, 13, 2), (100, 64, 1000), (128, 64, 3), (300, 64, 3),
                                          (512, 64, 1000), (600, 64, 1000), (128, 8, 2), (600, 4, 2)])
def test_pairs_kernel_equals_brute_force(n, k, levels):
    """Brute force over all N² float64 sums (exact for float32 halves), ties to the lower expert; several heads;
    the torch path chooses the same pairs."""
    from hf_moe.moe.router.product_key import _pairs_torch

    from .test_product_key import brute_force

    torch.manual_seed(0)
    rows = (1 if n > 128 else 3) if INTERPRETED and n > 16 else 6
    log_probs = torch.randint(0, levels, (rows, 2, 2, n)).float().log_softmax(-1)
    experts, keys = _pairs(log_probs, k)
    for t in range(rows):
        for h in range(2):
            assert torch.equal(experts[t, h], brute_force(log_probs[t, h], k)[0]), (t, h)
    want_experts, want_keys = _pairs_torch(log_probs, k)
    assert torch.equal(experts, want_experts) and torch.equal(keys, want_keys)


def test_pairs_kernel_at_peers_shape_equals_brute_force():
    """PEER's selection (8 heads, k 8, N 128), ties included, against brute force over all N² float64 sums."""
    from .test_product_key import brute_force

    torch.manual_seed(0)
    log_probs = torch.randint(0, 4, (2, 8, 2, 128)).float().log_softmax(-1)
    experts, _ = _pairs(log_probs, 8)
    for t in range(2):
        for h in range(8):
            assert torch.equal(experts[t, h], brute_force(log_probs[t, h], 8)[0]), (t, h)


def test_pairs_kernel_ties_signed_zeros():
    """−0 and +0 are equal log-probabilities: the lower index wins, whichever zero it holds (with k 2 each half
    keeps its best two keys and the pruning drops the pair of second-ranked keys, so the halves' order decides)."""
    from .test_product_key import brute_force

    log_probs = -torch.rand(1, 1, 2, 16) - 1
    log_probs[..., 3], log_probs[..., 9] = -0.0, 0.0
    experts, _ = _pairs(log_probs, 2)
    want = brute_force(log_probs[0, 0], 2)[0]
    assert want[0] == 3 * 16 + 3 and torch.equal(experts[0, 0], want)


@pytest.mark.parametrize("n,k", [(2, 3), (12, 64), (128, 64)])
def test_pairs_kernel_ranks_by_exact_sums(n, k):
    """Sums that float32 would round together (`near_tie_log_probs`) are ranked by their exact value."""
    from .test_product_key import brute_force, near_tie_log_probs

    torch.manual_seed(0)
    log_probs = near_tie_log_probs(2, 3, n)
    experts, _ = _pairs(log_probs, k)
    for t in range(2):
        for h in range(3):
            want = brute_force(log_probs[t, h], k)[0]
            assert torch.equal(experts[t, h], want), (t, h)
            assert not torch.equal(brute_force(log_probs[t, h], k, torch.float32)[0], want)


@pytest.mark.parametrize("n,k,heads", [(16, 8, 3), (128, 64, 1)])
def test_kernel_scores_and_their_gradients_equal_the_gather(n, k, heads):
    """The router's kernel path (experts and scores from the kernel, the scores' gradient scattered to the keys)
    against the torch path's gather and sum: the same experts, equal scores, equal gradients of the logits (random
    weights of the scores; the scattered sums may add in another order, so they are compared at float32 rounding)."""
    from hf_moe.moe.router.product_key import _KernelScores, product_key_top_k

    torch.manual_seed(0)
    logits = torch.randn(5, heads, 2, n)
    weights = torch.randn(5, heads, k)
    got_logits = logits.clone().to(DEVICE).requires_grad_()
    index, score = _KernelScores.apply(got_logits, k)
    (score * weights.to(DEVICE)).sum().backward()
    want_logits = logits.clone().requires_grad_()
    want_index, want_score = product_key_top_k(want_logits, k)
    (want_score * weights).sum().backward()
    assert torch.equal(index.cpu(), want_index) and torch.equal(score.detach().cpu(), want_score.detach())
    torch.testing.assert_close(got_logits.grad.cpu(), want_logits.grad, rtol=1e-6, atol=1e-6)
    assert want_logits.grad.count_nonzero() > 0


@pytest.mark.parametrize("act", list(ACTS))
def test_experts_kernel_forward_and_backward_equal_float64(act):
    from hf_moe.moe.kernels.product_key_experts import product_key_experts

    torch.manual_seed(0)
    tokens, hidden, experts, top_k = (6, 40, 9, 4) if INTERPRETED else (300, 1024, 4096, 64)
    dtype = torch.float32 if INTERPRETED else torch.bfloat16
    x = (torch.randn(tokens, hidden) / 2).to(DEVICE, dtype).requires_grad_()
    up = (torch.randn(experts, hidden) * hidden**-0.5).to(DEVICE, dtype).requires_grad_()
    down = (torch.randn(experts, hidden) * hidden**-0.5).to(DEVICE, dtype).requires_grad_()
    index = torch.randint(0, experts, (tokens, top_k), device=DEVICE)
    index[0, 1] = index[0, 0]  # a token choosing one expert twice
    weights = torch.rand(tokens, top_k, device=DEVICE, requires_grad=True)
    out = product_key_experts(x, up, down, index, weights, act)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, up, down, weights), grad)
    ref = [t.detach().double().cpu().requires_grad_() for t in (x, up, down, weights)]
    i = index.cpu()
    want_out = torch.einsum("tk,tkh->th", ACTS[act](torch.einsum("tkh,th->tk", ref[1][i], ref[0])) * ref[3], ref[2][i])
    want = torch.autograd.grad(want_out, ref, grad.double().cpu())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, g, w in zip(("out", "x", "up", "down", "weights"), (out, *got), (want_out, *want)):
        err = ((g.double().cpu() - w).norm() / w.norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"
    again = torch.autograd.grad(product_key_experts(x, up, down, index, weights, act), (x, up, down, weights), grad)
    for g, h in zip(got, again):
        assert torch.equal(g, h), "backward is not deterministic"
    untouched = torch.ones(experts, dtype=torch.bool, device=DEVICE)
    untouched[index.unique()] = False
    assert got[1][untouched].abs().sum() == 0 and got[2][untouched].abs().sum() == 0


def test_experts_kernel_skips_sentinel_slots_and_reads_half_precision_weights():
    """Slots whose index is the sentinel E contribute nothing and get zero weight gradients, whatever their weight;
    bf16 weights are read as they are and their gradient comes back in bf16; the no-grad call (the launcher alone)
    equals the differentiable one bit for bit."""
    from hf_moe.moe.kernels.product_key_experts import product_key_experts

    torch.manual_seed(0)
    tokens, hidden, experts, top_k = 5, 24, 7, 4
    x = torch.randn(tokens, hidden, device=DEVICE, requires_grad=True)
    up = (torch.randn(experts, hidden) * hidden**-0.5).to(DEVICE).requires_grad_()
    down = (torch.randn(experts, hidden) * hidden**-0.5).to(DEVICE).requires_grad_()
    index = torch.randint(0, experts, (tokens, top_k), device=DEVICE)
    index[0, 2], index[3, 0], index[3, 3], index[4, 1] = experts, experts, experts, experts + 3
    weights = torch.rand(tokens, top_k, device=DEVICE).bfloat16().requires_grad_()
    out = product_key_experts(x, up, down, index, weights, "silu")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, up, down, weights), grad)
    assert got[3].dtype == torch.bfloat16
    real = (index < experts).cpu()
    ref = [t.detach().double().cpu().requires_grad_() for t in (x, up, down, weights)]
    i = index.cpu().clamp(max=experts - 1)
    coeff = F.silu(torch.einsum("tkh,th->tk", ref[1][i], ref[0])) * ref[3] * real
    want_out = torch.einsum("tk,tkh->th", coeff, ref[2][i])
    want = torch.autograd.grad(want_out, ref, grad.double().cpu())
    for name, g, w in zip(("out", "x", "up", "down"), (out, *got[:3]), (want_out, *want[:3])):
        err = ((g.double().cpu() - w).norm() / w.norm()).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    grad_weights = got[3].double().cpu()
    assert (grad_weights[~real] == 0).all()
    torch.testing.assert_close(grad_weights[real], want[3][real].bfloat16().double(), rtol=1e-2, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(product_key_experts(x, up, down, index, weights, "silu"), out)


@requires_cuda
def test_cuda_bf16_weight_gradients_are_the_float32_ones_rounded():
    """The weights' gradient does not depend on their values: with bf16 weights it is, bit for bit, the float32
    gradient (the same weights as float32) rounded to nearest even, as `Tensor.to` rounds."""
    from hf_moe.moe.kernels.product_key_experts import product_key_experts

    torch.manual_seed(0)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    up, down = (torch.randn(512, 256, device="cuda", dtype=torch.bfloat16) / 16 for _ in range(2))
    index = torch.randint(0, 513, (64, 16), device="cuda")
    weights = torch.rand(64, 16, device="cuda").bfloat16()
    grad = torch.randn_like(x)
    grads = []
    for w in (weights, weights.float()):
        w = w.requires_grad_()
        grads.append(torch.autograd.grad(product_key_experts(x, up, down, index, w, "silu"), w, grad)[0])
    assert grads[0].dtype == torch.bfloat16 and torch.equal(grads[0], grads[1].bfloat16())


@requires_cuda
def test_cuda_block_equals_float64_loop_with_no_host_sync():
    from hf_moe import HfMoeSparseMoeBlock

    from .test_product_key import _config, layer_loop

    torch.manual_seed(0)
    config = _config(hidden_act="silu", hidden_size=64, num_experts=256, num_experts_per_tok=16)
    config._experts_implementation = "hf_moe_gathered"
    block64 = HfMoeSparseMoeBlock(config).double()
    with torch.no_grad():
        for p in block64.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(40, 64, dtype=torch.float64)
    want = layer_loop(block64, x, config)
    block = HfMoeSparseMoeBlock(config).cuda().bfloat16()
    block.load_state_dict(block64.state_dict())
    xb = x.cuda().bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = block(xb)
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    err = ((out.double().cpu() - want).norm() / want.norm()).item()
    assert err < 3e-2, err
    assert block.experts.up_proj.grad is not None and block.router.weight.grad is not None


@requires_cuda
def test_cuda_compiled_block_has_no_graph_break_and_equals_float64():
    """Compiled and eager bf16 blocks may pick different experts on near-ties (Inductor rounds the router's
    normalisation differently), so each is compared with the float64 loop by relative norm, not with each other."""
    from hf_moe import HfMoeSparseMoeBlock

    from .test_product_key import _config, layer_loop

    torch.manual_seed(0)
    config = _config(hidden_act="relu2", hidden_size=64, num_experts=1024, num_experts_per_tok=16)
    config._experts_implementation = "hf_moe_gathered"
    block64 = HfMoeSparseMoeBlock(config).double()
    with torch.no_grad():  # the block alone is not initialised (a model's _init_weights does that)
        for p in block64.parameters():
            p.normal_(0, 0.2)
    block = HfMoeSparseMoeBlock(config).cuda().bfloat16()
    block.load_state_dict(block64.state_dict())
    x = torch.randn(2, 33, 64, device="cuda", dtype=torch.bfloat16)
    want = layer_loop(block64, x.double().cpu().view(-1, 64), config).view(2, 33, 64)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    compiled = torch.compile(block, fullgraph=True)
    x_compiled, x_eager = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, eager = compiled(x_compiled), block(x_eager)
    for name, out in (("compiled", got), ("eager", eager)):
        err = ((out.double().cpu() - want).norm() / want.norm()).item()
        assert err < 3e-2, f"{name}: relative error {err:.2e} against float64"
    got.float().square().sum().backward()
    eager.float().square().sum().backward()
    err = ((x_compiled.grad - x_eager.grad).float().norm() / x_eager.grad.float().norm()).item()
    assert err < 5e-2, f"input gradient, compiled vs eager: relative error {err:.2e}"


@requires_cuda
def test_cuda_custom_ops_pass_opcheck():
    from hf_moe.moe.kernels import product_key_top_k  # noqa: F401 (registers hf_moe::product_key_pairs)
    from hf_moe.moe.kernels.product_key_experts import product_key_experts_op

    torch.manual_seed(0)
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    up = torch.randn(100, 64, device="cuda", requires_grad=True)
    down = torch.randn(100, 64, device="cuda", requires_grad=True)
    index = torch.randint(0, 100, (8, 4), device="cuda")
    weights = torch.rand(8, 4, device="cuda", requires_grad=True)
    torch.library.opcheck(product_key_experts_op, (x, up, down, index, weights, "silu"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    log_probs = torch.randn(8, 2, 2, 10, device="cuda").log_softmax(-1)
    torch.library.opcheck(torch.ops.hf_moe.product_key_pairs.default, (log_probs, 5),
                          test_utils=("test_schema", "test_faketensor"))


@requires_cuda
def test_cuda_graphed_training_steps_equal_eager_ones():
    """`capture_moe_cuda_graphs` on a product-key block (selection, experts and table backward with no host sync):
    each replayed step on a new input gives the eager step's output and gradients."""
    from hf_moe import HfMoeSparseMoeBlock, capture_moe_cuda_graphs, release_moe_cuda_graphs

    from .test_product_key import _config

    torch.manual_seed(0)
    config = _config(hidden_act="silu", hidden_size=64, num_experts=1024, num_experts_per_tok=8,
                     product_key_heads=2, norm_topk_prob=True)
    config._experts_implementation = "hf_moe_gathered"
    block = HfMoeSparseMoeBlock(config).cuda().bfloat16().train()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    inputs = [torch.randn(2, 33, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def step(x: torch.Tensor) -> list[torch.Tensor]:
        x = x.clone().requires_grad_()
        block.zero_grad(set_to_none=True)
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().sum().backward()
        # clones: a replay's gradients are the graph's buffers, which the next replay overwrites
        return [out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]

    eager = [step(x) for x in inputs]
    capture_moe_cuda_graphs(block, 2, 33)
    try:
        graphed = [step(x) for x in inputs]
    finally:
        release_moe_cuda_graphs(block)
    for i, (want, got) in enumerate(zip(eager, graphed)):
        for j, (a, b) in enumerate(zip(want, got)):
            err = ((a.float() - b.float()).norm() / a.float().norm()).item()
            assert err < 1e-3, f"step {i}, tensor {j}: relative error {err:.2e}"
