"""Every experts backend computes the function of the reference loop, with its gradients.

CPU tests run in CI; the CUDA tests skip without a GPU and are run on the device machine
(`python -m pytest tests/test_experts_backends.py`): bf16 against a float32 reference, skewed routing,
experts that receive no token, dropped (sentinel) slots, no host sync, determinism.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.moe.experts import HfMoeExperts, grouped_experts_forward, sort_by_expert
from hf_moe.parallel.weight_grad_queue import WeightGradQueue

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_experts(hidden=32, inter=48, experts=8, top_k=2, act="silu", dtype=torch.float64, device="cpu"):
    cfg = HfMoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, hidden_act=act,
    )
    module = HfMoeExperts(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, hidden**-0.5)
        module.down_proj.normal_(0, inter**-0.5)
    return module


def make_routing(num_tokens, experts, top_k, kind, device="cpu", dtype=torch.float64):
    """Top-k expert indices and weights. `skewed`: Zipf-like choice, the last quarter of the experts never chosen,
    and some slots dropped (index = `experts`, weight 0)."""
    if kind == "uniform":
        index = torch.rand(num_tokens, experts, device=device).argsort(dim=-1)[:, :top_k]
    else:
        live = max(top_k, experts - experts // 4)
        probs = 1.0 / torch.arange(1, live + 1, device=device, dtype=torch.float32) ** 1.5
        index = torch.multinomial(probs.expand(num_tokens, live), top_k, replacement=False)
    weights = torch.rand(num_tokens, top_k, device=device, dtype=dtype)
    if kind == "skewed":
        dropped = torch.rand(num_tokens, top_k, device=device) < 0.1
        index = index.masked_fill(dropped, experts)
        weights = weights.masked_fill(dropped, 0.0)
    return index, weights


def reference(experts, x, index, weights):
    """The reference loop ("eager"), run in float64 on CPU copies of everything."""
    ref = make_experts(
        experts.hidden_dim, experts.intermediate_dim, experts.num_experts, act=experts.config.hidden_act,
        dtype=torch.float64,
    )
    with torch.no_grad():
        ref.gate_up_proj.copy_(experts.gate_up_proj)
        ref.down_proj.copy_(experts.down_proj)
    x = x.detach().cpu().double().requires_grad_(True)
    weights = weights.detach().cpu().double().requires_grad_(True)
    return forward_and_grads(HfMoeExperts.forward.__wrapped__, ref, x, index.cpu(), weights)


def forward_and_grads(fn, experts, x, index, weights):
    """Output and gradients of a fixed random projection of the output w.r.t. x, weights and both projections."""
    x = x.detach().requires_grad_(True)
    weights = weights.detach().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out = fn(experts, x, index, weights)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * probe.to(out.device)).sum().backward()
    grads = (x.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad)
    return [t.detach().double().cpu() for t in (out, *grads)]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


NAMES = ("out", "d_hidden", "d_weights", "d_gate_up", "d_down")


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_grouped_matches_reference_float64(kind, act):
    experts = make_experts(act=act)
    index, weights = make_routing(41, experts.num_experts, 2, kind)
    x = torch.randn(41, experts.hidden_dim, dtype=torch.float64)
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    want = reference(experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-12, name
    if kind == "skewed":
        idle = torch.ones(experts.num_experts, dtype=torch.bool)
        idle[index[index < experts.num_experts].unique()] = False
        assert idle.any()
        assert got[3][idle].abs().max() == 0 and got[4][idle].abs().max() == 0


def test_grouped_float32_within_design_tolerance():
    experts = make_experts(hidden=64, inter=96, experts=6, top_k=3, dtype=torch.float32)
    index, weights = make_routing(64, 6, 3, "skewed", dtype=torch.float32)
    x = torch.randn(64, 64)
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    want = reference(experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-5, name


def test_every_slot_dropped_and_no_tokens():
    experts = make_experts()
    x = torch.randn(5, experts.hidden_dim, dtype=torch.float64)
    index = torch.full((5, 2), experts.num_experts)
    out = grouped_experts_forward(experts, x, index, torch.zeros(5, 2, dtype=torch.float64))
    assert torch.equal(out, torch.zeros_like(out))
    empty = grouped_experts_forward(experts, x[:0], index[:0], torch.zeros(0, 2, dtype=torch.float64))
    assert empty.shape == (0, experts.hidden_dim)


def test_sort_by_expert_is_a_permutation_grouped_by_expert():
    num_experts, top_k = 7, 3
    index, _ = make_routing(50, num_experts, top_k, "skewed")
    token, order, position, offsets = sort_by_expert(index, num_experts)
    flat = index.reshape(-1)
    assert torch.equal(order[position], torch.arange(flat.numel()))
    assert torch.equal(token, order // top_k)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    assert torch.equal(offsets.long(), counts.cumsum(0))
    assert offsets.dtype == torch.int32
    assert torch.equal(flat[order][: offsets[-1]], torch.repeat_interleave(torch.arange(num_experts), counts))


def mostly_elsewhere(num_tokens, experts, top_k, device="cpu", dtype=torch.float64):
    """Routing as one rank of expert parallelism sees it: ~70 % of the slots are sentinels (another rank's experts)
    and every token keeps at least one real slot. Returns the index, the weights and the number of real slots."""
    index, weights = make_routing(num_tokens, experts, top_k, "uniform", device=device, dtype=dtype)
    elsewhere = torch.rand(num_tokens, top_k, device=device) < 0.7
    elsewhere[:, 0] = False
    index, weights = index.masked_fill(elsewhere, experts), weights.masked_fill(elsewhere, 0.0)
    return index, weights, int((~elsewhere).sum())


def test_known_slot_count_sizes_buffers_to_the_real_slots():
    """`num_slots` (known under expert parallelism) keeps real rows + one dropped row and changes no result."""
    experts = make_experts(top_k=4)
    index, weights, num_slots = mostly_elsewhere(37, experts.num_experts, 4)
    token, order, position, offsets = sort_by_expert(index, experts.num_experts, num_slots)
    assert token.numel() == order.numel() == num_slots + 1 and offsets[-1] == num_slots
    real = index.reshape(-1) < experts.num_experts
    assert torch.equal(order[position[real]], torch.arange(index.numel())[real])
    assert (position[~real] == num_slots).all()
    x = torch.randn(37, experts.hidden_dim, dtype=torch.float64)
    got = forward_and_grads(functools.partial(grouped_experts_forward, num_slots=num_slots), experts, x, index, weights)
    want = reference(experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-12, name
    assert got[2][~real.view(37, 4)].abs().max() == 0, "sentinel slots get no routing-weight gradient"


def test_deferred_weight_grads_run_by_the_end_of_backward_and_accumulate():
    """With a `WeightGradQueue` (expert parallelism), the experts' backward leaves both weight gradients to the
    queue: they are still pending when the gradient reaches the input, run when the backward pass ends at the
    latest, equal the float64 reference, and accumulate over backward passes as autograd's would."""
    experts = make_experts(top_k=2)
    index, weights = make_routing(29, experts.num_experts, 2, "skewed")
    x = torch.randn(29, experts.hidden_dim, dtype=torch.float64)
    queue, pending_at_input = WeightGradQueue(), []

    def deferred(experts, x, index, weights):
        x.register_hook(lambda grad: pending_at_input.append((len(queue), experts.gate_up_proj.grad is None)))
        return grouped_experts_forward(experts, x, index, weights, weight_grads=queue)

    got = forward_and_grads(deferred, experts, x, index, weights)
    assert pending_at_input == [(2, True)] and len(queue) == 0
    for name, g, w in zip(NAMES, got, reference(experts, x, index, weights)):
        assert rel_err(g, w) < 1e-12, name
    first = [experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()]
    out = grouped_experts_forward(experts, x, index, weights, weight_grads=queue)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * probe).sum().backward()  # no zero_grad: the second pass adds to the first
    assert torch.equal(experts.gate_up_proj.grad, 2 * first[0]) and torch.equal(experts.down_proj.grad, 2 * first[1])


def test_weights_that_are_not_leaves_keep_their_gradients_in_autograd():
    """PEFT feeds the experts `base + ΔW`, not a parameter: nothing is deferred and the gradient reaches the
    parameter behind it through autograd."""
    experts = make_experts(top_k=2)
    index, weights = make_routing(23, experts.num_experts, 2, "uniform")
    x = torch.randn(23, experts.hidden_dim, dtype=torch.float64)
    want = reference(experts, x, index, weights)
    queue, pending_at_input = WeightGradQueue(), []

    scale = torch.ones((), dtype=torch.float64, requires_grad=True)

    def merged(experts, x, index, weights):  # the experts as PEFT's target_parameters wrapper presents them
        x.register_hook(lambda grad: pending_at_input.append(len(queue)))
        view = SimpleNamespace(num_experts=experts.num_experts, config=experts.config, act_fn=experts.act_fn,
                               gate_up_proj=experts.gate_up_proj * scale, down_proj=experts.down_proj * scale)
        return grouped_experts_forward(view, x, index, weights, weight_grads=queue)

    got = forward_and_grads(merged, experts, x, index, weights)
    assert pending_at_input == [0] and scale.grad is not None
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-12, name


class _FreshWeightGrads(TorchDispatchMode):
    """Watches every op's outputs: tensors shaped like an expert weight (`shapes`) that are not `known` (the
    parameters and their existing `.grad`, which in-place accumulation returns) are fresh weight gradients. After
    each op it records which shapes have a fresh tensor alive."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], known: list[torch.Tensor]):
        super().__init__()
        self.shapes, self.known = shapes, {id(t) for t in known}
        self.fresh: list[tuple[tuple[int, ...], weakref.ref]] = []
        self.alive_together: list[set[tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes and id(t) not in self.known:
                self.fresh.append((tuple(t.shape), weakref.ref(t)))
        self.alive_together.append({shape for shape, ref in self.fresh if ref() is not None})
        return out


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_accumulating_backward_never_holds_both_expert_weight_gradients(act):
    """With gradients accumulating into existing `.grad` (gradient accumulation), backward adds the down
    projection's weight gradient into `.grad` and frees it before it computes the gate/up projection's: the two
    fresh `[E, H, I]` and `[E, 2I, H]` tensors are never alive at once (transformers' experts behave so too; one
    autograd node returning both kept an extra expert-weight-sized tensor at the backward peak)."""
    experts = make_experts(hidden=32, inter=48, experts=4, top_k=2, act=act, dtype=torch.float32)
    index, weights = make_routing(40, 4, 2, "skewed", dtype=torch.float32)
    x = torch.randn(40, 32, requires_grad=True)
    weights.requires_grad_(True)
    grouped_experts_forward(experts, x, index, weights).square().sum().backward()  # `.grad` now exists
    first = [experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()]
    params = [experts.gate_up_proj, experts.down_proj]
    down, gate_up = tuple(experts.down_proj.shape), tuple(experts.gate_up_proj.shape)
    loss = grouped_experts_forward(experts, x, index, weights).square().sum()
    with _FreshWeightGrads((down, gate_up), params + [p.grad for p in params]) as watch:
        loss.backward()
    assert {shape for shape, _ in watch.fresh} == {down, gate_up}, "backward made both weight gradients"
    assert not any(alive == {down, gate_up} for alive in watch.alive_together), "both alive at once"
    assert torch.equal(experts.gate_up_proj.grad, 2 * first[0]) and torch.equal(experts.down_proj.grad, 2 * first[1])


@pytest.mark.parametrize("deferred", [False, True])
def test_accumulated_gradients_match_float64_reference(deferred):
    """Two float32 backward passes with different output gradients and no zero_grad in between accumulate, in
    every gradient (input, routing weights, both projections), the sum of the two float64 reference gradients."""
    experts = make_experts(hidden=64, inter=96, experts=6, top_k=3, dtype=torch.float32)
    index, weights = make_routing(50, 6, 3, "skewed", dtype=torch.float32)
    x = torch.randn(50, 64)
    ref = make_experts(64, 96, 6, top_k=3, dtype=torch.float64)
    with torch.no_grad():
        ref.gate_up_proj.copy_(experts.gate_up_proj)
        ref.down_proj.copy_(experts.down_proj)
    queue = WeightGradQueue() if deferred else None
    leaves = [x.requires_grad_(True), weights.requires_grad_(True), experts.gate_up_proj, experts.down_proj]
    ref_leaves = [x.detach().double().requires_grad_(True), weights.detach().double().requires_grad_(True),
                  ref.gate_up_proj, ref.down_proj]
    for seed in (1, 2):
        probe = torch.randn(50, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out = grouped_experts_forward(experts, x, index, weights, weight_grads=queue)
        (out.double() * probe).sum().backward()
        want = HfMoeExperts.forward.__wrapped__(ref, ref_leaves[0], index, ref_leaves[1])
        (want * probe).sum().backward()
    assert queue is None or len(queue) == 0
    for name, got, want in zip(("d_hidden", "d_weights", "d_gate_up", "d_down"), leaves, ref_leaves):
        assert rel_err(got.grad.double(), want.grad) < 1e-5, name


def test_model_defaults_to_hf_moe_grouped_and_switches():
    cfg = HfMoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
    )
    model = HfMoeForCausalLM(cfg)
    assert model.config._experts_implementation == "hf_moe_grouped"
    assert "hf_moe_grouped" in ALL_EXPERTS_FUNCTIONS
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        fast = model(ids).logits
        model.set_experts_implementation("grouped_mm")
        assert model.config._experts_implementation == "grouped_mm"
        peer = model(ids).logits
    torch.testing.assert_close(fast, peer, rtol=1e-4, atol=1e-5)


def test_decode_kernels_are_chosen_from_shapes_and_flags_alone():
    """Which calls take the decode kernels (decided on the host, so CUDA graphs and torch.compile see one path):
    half-precision SiLU experts, nothing that needs a gradient, at most `DECODE_ROWS_PER_EXPERT` rows per expert on
    average. Checked on CPU tensors planned as if the Triton kernels served them; the kernels themselves are tested on
    the GPU."""
    from hf_moe.moe.experts.plan import DECODE_ROWS_PER_EXPERT, override_plan, plan_experts

    experts = make_experts(16, 24, 8, 2, dtype=torch.bfloat16)
    gelu = make_experts(16, 24, 8, 2, act="gelu", dtype=torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    weights = torch.rand(5, 2, dtype=torch.bfloat16)
    limit = DECODE_ROWS_PER_EXPERT * experts.num_experts

    def decodes(experts, x, weights, num_rows):
        return plan_experts(experts, x, weights, num_rows).decode

    with override_plan(triton=True):
        with torch.no_grad():
            assert decodes(experts, x, weights, limit)
            assert not decodes(experts, x, weights, limit + 1)
            assert not decodes(gelu, x, weights, 10)  # another activation
        assert not decodes(experts, x, weights, 10)  # the expert weights require grad
        with torch.inference_mode():
            assert decodes(experts, x, weights, 10)
        experts.requires_grad_(False)
        assert decodes(experts, x, weights, 10)
        assert not decodes(experts, x.requires_grad_(True), weights, 10)
        with torch.no_grad():
            assert not decodes(experts.float(), x.float(), weights.float(), 10)


def test_own_gemms_are_chosen_from_shapes_and_flags_alone(monkeypatch):
    """Which GEMMs run as hf-moe's Triton kernels (decided on the host): few rows per expert, enough multiply-adds,
    whether or not torch.compile traces. Checked on CPU tensors planned as if torch's grouped GEMM and the Triton
    kernels served them: the gate/up GEMM of `rows` rows of 3 experts, `[rows, 6] @ [3, 6, 2·inter]`."""
    from hf_moe.moe.experts.plan import override_plan, plan_experts

    def own(rows, inter=4):
        experts = SimpleNamespace(config=SimpleNamespace(hidden_act="silu"), gate_up_proj=torch.empty(3, 2 * inter, 6),
                                  down_proj=torch.empty(3, 6, inter))
        return plan_experts(experts, torch.empty(1, 6), torch.empty(1, 2), rows).gate_up_gemm == "triton"

    with override_plan(triton=True, grouped_mm=True, own_gemm_rows_per_expert=4, own_gemm_min_multiply_adds=10 * 6 * 8):
        assert own(12)
        assert own(10)
        assert not own(13)  # more than 4 rows per expert
        assert not own(9)  # too few multiply-adds
        assert not own(12, inter=3)  # too few multiply-adds
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert own(12)  # torch.compile traces the Triton GEMM as the custom op hf_moe::grouped_mm


def test_cpu_path_never_imports_triton_kernels():
    # a fresh interpreter: on a GPU machine the CUDA tests of this session import the kernels themselves
    code = (
        "import sys, torch; from tests.test_experts_backends import make_experts, make_routing; "
        "from hf_moe.moe.experts import grouped_experts_forward; experts = make_experts(); "
        "index, weights = make_routing(9, experts.num_experts, 2, 'uniform'); "
        "x = torch.randn(9, experts.hidden_dim, dtype=torch.float64); "
        "out = grouped_experts_forward(experts, x, index, weights); "
        "assert torch.isfinite(out).all(); "
        "print(any(m in sys.modules for m in ('hf_moe.moe.kernels.gather', 'hf_moe.moe.kernels.swiglu', "
        "'hf_moe.moe.kernels.grouped_gemm')))"
    )
    root = Path(__file__).resolve().parent.parent
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert loaded.stdout.strip() == "False"


# ------------------------------------------------------------------ CUDA (run on the device machine)


@requires_cuda
@pytest.mark.parametrize("shape", [(256, 384, 16, 4), (512, 1024, 8, 2), (128, 200, 5, 2)])
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_cuda_bf16_matches_float32_reference(shape, kind):
    """bf16 on the GPU against the float64 loop; the error must be bf16-sized and no larger than transformers'
    own grouped_mm's error on the same inputs."""
    hidden, inter, num_experts, top_k = shape
    experts = make_experts(hidden, inter, num_experts, top_k, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(333, num_experts, top_k, kind, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(333, hidden, device="cuda", dtype=torch.bfloat16)
    want = reference(experts, x, index, weights)
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    peer = forward_and_grads(ALL_EXPERTS_FUNCTIONS["grouped_mm"], experts, x, index, weights)
    for name, g, p, w in zip(NAMES, got, peer, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < max(1e-2, 1.5 * rel_err(p, w)), (name, rel_err(g, w), rel_err(p, w))
    if kind == "skewed":
        idle = torch.ones(num_experts, dtype=torch.bool)
        idle[index[index < num_experts].unique().cpu()] = False
        assert idle.any()
        assert got[3][idle].abs().max() == 0 and got[4][idle].abs().max() == 0


@requires_cuda
def test_cuda_known_slot_count_matches_reference():
    experts = make_experts(256, 384, 16, 8, dtype=torch.bfloat16, device="cuda")
    index, weights, num_slots = mostly_elsewhere(500, 16, 8, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(500, 256, device="cuda", dtype=torch.bfloat16)
    want = reference(experts, x, index, weights)
    full = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    got = forward_and_grads(functools.partial(grouped_experts_forward, num_slots=num_slots), experts, x, index, weights)
    for name, g, f, w in zip(NAMES, got, full, want):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) < max(1e-2, 1.5 * rel_err(f, w)), (name, rel_err(g, w), rel_err(f, w))


@requires_cuda
def test_cuda_float32_matches_reference():
    experts = make_experts(64, 96, 6, 2, dtype=torch.float32, device="cuda")
    index, weights = make_routing(100, 6, 2, "skewed", device="cuda", dtype=torch.float32)
    x = torch.randn(100, 64, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    want = reference(experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-5, name


@requires_cuda
def test_cuda_no_host_sync_and_deterministic():
    # 1024 tokens × 8 slots: past the 4096 rows where torch.sort switches from its in-place kernel to cub.
    experts = make_experts(256, 384, 16, 8, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(1024, 16, 8, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    forward_and_grads(grouped_experts_forward, experts, x, index, weights)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xg, wg = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        out = grouped_experts_forward(experts, xg, index, wg)
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    first = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    second = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@requires_cuda
def test_cuda_triton_kernels_match_torch_fallbacks():
    from hf_moe.moe.experts import grouped as backend
    from hf_moe.moe.kernels import gather, swiglu

    rows, inter, hidden = 300, 200, 96
    offsets = torch.tensor([40, 40, 150, 260], device="cuda", dtype=torch.int32)  # rows 260.. are dropped
    gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(rows, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    act = torch.nn.SiLU()
    valid = slice(0, 260)
    ref_h = backend._gated_act(gate_up.float(), weight.float(), offsets, act, False)
    fused = swiglu.swiglu_forward(gate_up, weight, offsets)[valid].float()
    torch.testing.assert_close(fused, ref_h[valid], rtol=2e-2, atol=1e-2)
    d_gu, d_w, h = swiglu.swiglu_backward(gate_up, weight, grad, offsets, True)
    r_gu, r_w, r_h = backend._gated_act_backward(
        gate_up.float(), weight.float(), grad.float(), offsets, act, False, True
    )
    torch.testing.assert_close(d_gu[valid].float(), r_gu[valid], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(d_w[valid], r_w[valid], rtol=1e-3, atol=1e-3)
    assert torch.equal(d_w[260:], torch.zeros_like(d_w[260:]))
    torch.testing.assert_close(h[valid].float(), r_h[valid], rtol=2e-2, atol=1e-2)
    table = torch.randn(77, hidden, device="cuda", dtype=torch.bfloat16)
    token = torch.randint(0, 77, (rows,), device="cuda")
    assert torch.equal(gather.gather_rows(table, token, offsets)[valid], table[token][valid])
    num_tokens, top_k = 150, 2
    src = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    src[260:] = float("nan")  # dropped rows must never be read
    position = torch.randperm(rows, device="cuda")
    out = gather.gather_sum(src, position, offsets, num_tokens)
    rows_ = src.float()[position].view(num_tokens, top_k, hidden)
    want = torch.where((position < 260).view(num_tokens, top_k, 1), rows_, 0).sum(1)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
    # strided rows (the expert-parallel dispatcher packs routing bytes after each token's H values)
    wide = torch.randn(rows, hidden + 24, device="cuda", dtype=torch.bfloat16)
    strided_out = torch.full((rows, hidden + 8), 7.0, device="cuda", dtype=torch.bfloat16)
    gather.gather_rows(wide[:77, :hidden], token, offsets, out=strided_out[:, :hidden])
    assert torch.equal(strided_out[valid, :hidden], wide[:77, :hidden][token][valid])
    assert (strided_out[:, hidden:] == 7).all() and (strided_out[260:] == 7).all(), "wrote outside its rows"
    wide[:, :hidden] = src
    assert torch.equal(gather.gather_sum(wide[:, :hidden], position, offsets, num_tokens), out)


@requires_cuda
def test_cuda_in_place_swiglu_backward_equals_the_out_of_place_kernel():
    from hf_moe.moe.kernels import swiglu

    rows, inter = 300, 200
    offsets = torch.tensor([90, 90, 270], device="cuda", dtype=torch.int32)  # rows 270.. are dropped
    gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(rows, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(rows, inter, device="cuda", dtype=torch.bfloat16)
    want = swiglu.swiglu_backward(gate_up, weight, grad, offsets, True)
    gate_up_buffer, grad_buffer = gate_up.clone(), grad.clone()
    got = swiglu.swiglu_backward(gate_up_buffer, weight, grad_buffer, offsets, True, in_place=True)
    assert got[0].data_ptr() == gate_up_buffer.data_ptr() and got[2].data_ptr() == grad_buffer.data_ptr()
    valid = slice(0, 270)
    for name, g, w in zip(("d_gate_up", "d_weight", "recomputed"), got, want):
        assert torch.equal(g[valid], w[valid]), name


@requires_cuda
def test_cuda_backward_frees_the_saved_gate_up_and_refuses_a_second_backward(monkeypatch):
    """The SwiGLU backward writes its gradient over the saved gate/up projection: the fwd+bwd peak drops by about
    one `[S, 2I]` tensor, and a retain_graph second backward fails loudly instead of reading gradients. Enough
    tokens that the down node's backward (where the SwiGLU backward runs) holds the peak, not the gate/up node's
    weight gradient `[E, 2I, H]`."""
    tokens, hidden, inter, num_experts, top_k = 8192, 1024, 4096, 8, 2
    experts = make_experts(hidden, inter, num_experts, top_k, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(tokens, num_experts, top_k, "uniform", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def peak_bytes() -> int:
        experts.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grouped_experts_forward(experts, x, index, weights).float().square().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    grads = []
    in_place = peak_bytes()
    grads.append([experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone(), x.grad.clone()])
    x.grad = None
    with monkeypatch.context() as patch:  # the traced (torch.compile) branch keeps the buffer
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        out_of_place = peak_bytes()
    grads.append([experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone(), x.grad.clone()])
    for got, want in zip(*grads):
        assert torch.equal(got, want)
    gate_up_bytes = tokens * top_k * 2 * inter * 2
    assert out_of_place - in_place >= 0.9 * gate_up_bytes, (out_of_place, in_place, gate_up_bytes)
    out = grouped_experts_forward(experts, x, index, weights).float().square().sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()


@requires_cuda
def test_cuda_compiled_fullgraph_matches_eager():
    """torch.compile traces the whole CUDA path (autograd Function, Triton kernels, grouped GEMMs) without a graph
    break; it runs the out-of-place backward, eager the in-place one: same results."""
    experts = make_experts(256, 384, 16, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(700, 16, 4, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(grouped_experts_forward, fullgraph=True)
    want = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    got = forward_and_grads(compiled, experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-3, (name, rel_err(g, w))


# ------------------------------------------------------------------ decode kernels (CUDA, inference)


def _decode_calls(monkeypatch) -> list[int]:
    """Counts calls of the decode kernels' entry point."""
    from hf_moe.moe.kernels import decode

    calls = []
    original = decode.decode_experts_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_experts_forward", counting)
    return calls


def _grouped_path(experts, x, index, weights, **kwargs):
    """The general grouped-GEMM path on the same inputs (gradients on, so the decode kernels stay out)."""
    with torch.enable_grad():
        return grouped_experts_forward(experts, x.detach().requires_grad_(True), index, weights, **kwargs).detach()


@requires_cuda
@pytest.mark.parametrize("shape", [(256, 384, 16, 4), (96, 200, 5, 2), (512, 1024, 64, 8)])
@pytest.mark.parametrize("kind", ["uniform", "skewed", "one_expert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_decode_kernels_match_reference(monkeypatch, shape, kind, dtype):
    """Inference with few rows per expert runs the decode kernels; their output matches the float64 loop as well
    as the grouped-GEMM path does, with experts that get no token, dropped slots, and (`one_expert`) every token
    on expert 0 so that it loops over several row blocks."""
    hidden, inter, num_experts, top_k = shape
    tokens = 2 * num_experts // top_k + 3  # ≤ 16 rows per expert on average
    experts = make_experts(hidden, inter, num_experts, top_k, dtype=dtype, device="cuda")
    index, weights = make_routing(tokens, num_experts, top_k, "uniform" if kind == "one_expert" else kind,
                                  device="cuda", dtype=dtype)
    if kind == "one_expert":
        index[:, 0] = 0
        index[:, 1:] = torch.where(index[:, 1:] == 0, 1, index[:, 1:])
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    calls = _decode_calls(monkeypatch)
    with torch.no_grad():
        got = grouped_experts_forward(experts, x, index, weights)
    assert calls, "the decode kernels did not run"
    want = reference(experts, x, index, weights)[0]
    general = _grouped_path(experts, x, index, weights)
    assert torch.isfinite(got).all()
    assert rel_err(got.double().cpu(), want) < max(1e-2, 1.5 * rel_err(general.double().cpu(), want))


@requires_cuda
def test_cuda_decode_kernels_with_known_slot_count_and_strided_weights(monkeypatch):
    """The expert-parallel call (`num_slots`, most slots elsewhere) and weights that are views with other strides
    (a slice of a larger tensor; a transposed copy) give the general path's result."""
    experts = make_experts(256, 384, 16, 8, dtype=torch.bfloat16, device="cuda")
    index, weights, num_slots = mostly_elsewhere(20, 16, 8, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(20, 256, device="cuda", dtype=torch.bfloat16)
    want = reference(experts, x, index, weights)[0]
    calls = _decode_calls(monkeypatch)
    with torch.no_grad():
        got = grouped_experts_forward(experts, x, index, weights, num_slots=num_slots)
        wide = torch.randn(16, 2 * 384 + 8, 256 + 24, device="cuda", dtype=torch.bfloat16)
        wide[:, 4 : 4 + 2 * 384, :256] = experts.gate_up_proj
        down_t = experts.down_proj.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major
        experts.gate_up_proj = torch.nn.Parameter(wide[:, 4 : 4 + 2 * 384, :256])
        experts.down_proj = torch.nn.Parameter(down_t)
        strided = grouped_experts_forward(experts, x, index, weights)
    assert len(calls) == 2
    for out in (got, strided):
        assert rel_err(out.double().cpu(), want) < 1e-2


@requires_cuda
def test_cuda_decode_path_only_without_gradients_and_for_few_rows(monkeypatch):
    """Training (anything that needs a gradient), fp32 weights and batches with many rows per expert keep the
    grouped GEMMs."""
    from hf_moe.moe.experts.plan import DECODE_ROWS_PER_EXPERT

    experts = make_experts(128, 256, 8, 2, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(40, 8, 2, "uniform", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(40, 128, device="cuda", dtype=torch.bfloat16)
    calls = _decode_calls(monkeypatch)
    grouped_experts_forward(experts, x, index, weights)  # the weights require grad
    many = DECODE_ROWS_PER_EXPERT * 8 // 2 + 1  # tokens: just over the decode path's rows per expert
    with torch.no_grad():
        big_index, big_weights = make_routing(many, 8, 2, "uniform", device="cuda", dtype=torch.bfloat16)
        grouped_experts_forward(experts, torch.randn(many, 128, device="cuda", dtype=torch.bfloat16), big_index,
                                big_weights)
        grouped_experts_forward(experts.float(), x.float(), index, weights.float())
    assert not calls
    with torch.no_grad():
        grouped_experts_forward(experts.bfloat16(), x, index, weights)
    assert len(calls) == 1


@requires_cuda
def test_cuda_decode_kernels_capture_in_a_graph_without_host_sync():
    """One decode step replays from a CUDA graph: no host sync, and the replay on new routing equals eager."""
    experts = make_experts(256, 384, 32, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(24, 32, 4, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(24, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        grouped_experts_forward(experts, x, index, weights)  # compile the kernels first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = grouped_experts_forward(experts, x, index, weights)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        new_index, new_weights = make_routing(24, 32, 4, "uniform", device="cuda", dtype=torch.bfloat16)
        index.copy_(new_index)
        weights.copy_(new_weights)
        x.normal_()
        graph.replay()
        want = grouped_experts_forward(experts, x, index, weights)
    assert torch.equal(out, want)


@requires_cuda
def test_cuda_decode_kernels_compile_fullgraph():
    experts = make_experts(256, 384, 16, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(30, 16, 4, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(30, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(grouped_experts_forward, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(experts, x, index, weights).float(), grouped_experts_forward(experts, x, index,
                                                                                            weights).float()) < 1e-3


@requires_cuda
def test_cuda_generate_runs_the_decode_kernels_and_matches_the_grouped_gemms(monkeypatch):
    """A bf16 model's `generate` (prefill, then one token at a time with the KV cache) takes the decode kernels,
    and its logits agree with the grouped-GEMM path's to bf16 rounding."""
    from hf_moe.moe.experts.plan import override_plan

    from .conftest import tiny_config

    config = tiny_config(hidden_size=128, moe_intermediate_size=96, num_experts=16, num_experts_per_tok=4)
    model = HfMoeForCausalLM(config).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, config.vocab_size, (2, 9), device="cuda")
    calls = _decode_calls(monkeypatch)
    with torch.no_grad():
        sequences = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert len(calls) >= 6 * config.num_hidden_layers  # the prefill and five single-token steps
    with torch.no_grad():
        fast = model(sequences).logits.float()
        with override_plan(decode_rows_per_expert=0):
            grouped = model(sequences).logits.float()
    assert rel_err(fast, grouped) < 2e-2, rel_err(fast, grouped)


# ------------------------------------------------------------------ own grouped GEMMs (CUDA, Hopper or newer)

requires_tma = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs a GPU with TMA (sm90+)"
)


def _loop_grouped_mm(a, b, offsets):
    """The float64 loop: rows of expert e = a_e @ b[e]; rows past offsets[-1] stay zero."""
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float64)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        out[start:end] = a[start:end].cpu().double() @ b[expert].cpu().double()
        start = end
    return out


# Rows per expert: idle experts, several 128-row tiles, a single row, one expert with every row, a single expert.
OFFSET_CASES = [[7, 0, 300, 1, 0, 19], [0, 0, 0, 513], [150]]


def _limit_programs(monkeypatch, programs: int | None) -> None:
    """Run the persistent kernels on `programs` programs (None: one per SM), so that each walks several tiles."""
    from hf_moe.moe.kernels import grouped_gemm

    if programs is not None:
        monkeypatch.setattr(grouped_gemm, "_num_sms", lambda device_index: programs)


@requires_tma
@pytest.mark.parametrize("programs", [None, 1, 3])
@pytest.mark.parametrize("counts", OFFSET_CASES)
@pytest.mark.parametrize("layout", ["k_major", "row_major"])
def test_cuda_own_grouped_mm_matches_float64_loop(monkeypatch, counts, layout, programs):
    """Both weight layouts the experts use (stored `[E, N, K]` read transposed, and row-major `[E, K, N]` in
    backward), at sizes that are not multiples of the tiles, with one program per SM and with a few programs that
    each walk several tiles. An idle expert's weights are NaN: a tile that read another expert's weights would
    spread them."""
    from hf_moe.moe.kernels import grouped_gemm

    _limit_programs(monkeypatch, programs)
    K, N = 72, 520  # three column blocks, the last partial
    offsets = torch.tensor(counts).cumsum(0).to(device="cuda", dtype=torch.int32)
    num_valid = int(offsets[-1])
    a = torch.randn(num_valid + 5, K, device="cuda", dtype=torch.bfloat16)  # 5 dropped rows
    shape = (len(counts), N, K) if layout == "k_major" else (len(counts), K, N)
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16) / K**0.5
    idle = [e for e, c in enumerate(counts) if c == 0]
    w[idle] = float("nan")
    b = w.transpose(1, 2) if layout == "k_major" else w
    assert grouped_gemm.supports(a, b)
    got = grouped_gemm.grouped_mm(a, b, offsets)[:num_valid].double().cpu()
    want = _loop_grouped_mm(a, b, offsets)[:num_valid]
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-2


@requires_tma
@pytest.mark.parametrize("programs", [None, 1, 3])
@pytest.mark.parametrize("counts", OFFSET_CASES)
def test_cuda_own_gate_up_swiglu_matches_float64_loop_and_the_unfused_kernels(monkeypatch, counts, programs):
    from hf_moe.moe.kernels import grouped_gemm, swiglu

    _limit_programs(monkeypatch, programs)
    hidden, inter = 72, 300  # three column blocks, the last partial
    offsets = torch.tensor(counts).cumsum(0).to(device="cuda", dtype=torch.int32)
    num_valid = int(offsets[-1])
    x = torch.randn(num_valid + 5, hidden, device="cuda", dtype=torch.bfloat16)
    gate_up_proj = torch.randn(len(counts), 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    weight = torch.rand(num_valid + 5, device="cuda")
    gate_up, act = grouped_gemm.gate_up_swiglu(x, gate_up_proj, weight, offsets)
    want = _loop_grouped_mm(x, gate_up_proj.transpose(1, 2), offsets)[:num_valid]
    gate, up = want.chunk(2, dim=-1)
    want_act = torch.nn.functional.silu(gate) * up * weight[:num_valid, None].double().cpu()
    assert rel_err(gate_up[:num_valid].double().cpu(), want) < 1e-2
    assert rel_err(act[:num_valid].double().cpu(), want_act) < 1e-2
    # the activation is the unfused kernel's on the stored (rounded) projection, which backward recomputes
    unfused = swiglu.swiglu_forward(gate_up, weight, offsets)
    torch.testing.assert_close(act[:num_valid], unfused[:num_valid], rtol=1e-2, atol=1e-3)


@requires_tma
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_cuda_own_gemms_serve_few_rows_per_expert_and_match_torch_gemms(monkeypatch, kind):
    """Where the plan chooses them, forward and backward take the Triton GEMMs (the gate/up one fused with
    SwiGLU) and agree with the same path on torch's grouped GEMM; above `own_gemm_rows_per_expert` they are not
    called."""
    from hf_moe.moe.experts.plan import override_plan
    from hf_moe.moe.kernels import grouped_gemm

    calls = []

    def counting(name, kernel):
        def call(*args):
            calls.append(name)
            return kernel(*args)

        return call

    for name in ("grouped_mm", "gate_up_swiglu"):
        monkeypatch.setattr(grouped_gemm, name, counting(name, getattr(grouped_gemm, name)))
    experts = make_experts(256, 384, 16, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(700, 16, 4, kind, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16)
    with override_plan(own_gemm_min_multiply_adds=0):  # these test experts are small
        own = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    assert calls == ["gate_up_swiglu", "grouped_mm", "grouped_mm", "grouped_mm"], calls
    calls.clear()
    with override_plan(own_gemm_min_multiply_adds=0, own_gemm_rows_per_expert=700 * 4 // 16 - 1):
        torch_gemms = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    assert calls == []
    want = reference(experts, x, index, weights)
    for name, o, t, w in zip(NAMES, own, torch_gemms, want):
        assert torch.isfinite(o).all(), name
        assert rel_err(o, t) < 1e-2, (name, rel_err(o, t))
        assert rel_err(o, w) < max(1e-2, 1.5 * rel_err(t, w)), (name, rel_err(o, w), rel_err(t, w))


@requires_tma
def test_cuda_own_gemms_no_host_sync_and_deterministic():
    from hf_moe.moe.experts.plan import override_plan

    with override_plan(own_gemm_min_multiply_adds=0):
        _own_gemms_no_host_sync_and_deterministic()


def _own_gemms_no_host_sync_and_deterministic():
    from hf_moe.moe.experts.plan import plan_experts
    from hf_moe.moe.kernels import grouped_gemm

    experts = make_experts(256, 384, 16, 8, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(1024, 16, 8, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    assert plan_experts(experts, x, weights, 1024 * 8).gate_up_gemm == "triton"
    assert grouped_gemm.supports(x.new_empty(1024 * 8, 256), experts.gate_up_proj.transpose(1, 2))
    first = forward_and_grads(grouped_experts_forward, experts, x, index, weights)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xg, wg = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        grouped_experts_forward(experts, xg, index, wg).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    second = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@requires_tma
def test_cuda_own_gemms_take_expert_weights_stored_transposed():
    """Expert weights whose storage is `[E, K, N]` (a transposed view of the usual `[E, N, K]`, as a converter or an
    adapter may hand over) run through the same path and give the same results."""
    from hf_moe.moe.experts.plan import override_plan

    with override_plan(own_gemm_min_multiply_adds=0):
        _own_gemms_take_expert_weights_stored_transposed()


def _own_gemms_take_expert_weights_stored_transposed():
    experts = make_experts(256, 384, 16, 4, dtype=torch.bfloat16, device="cuda")
    index, weights = make_routing(500, 16, 4, "skewed", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(500, 256, device="cuda", dtype=torch.bfloat16)
    want = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            stored = getattr(experts, name).detach().transpose(1, 2).contiguous().transpose(1, 2)
            setattr(experts, name, torch.nn.Parameter(stored))
    assert experts.gate_up_proj.stride(1) == 1
    got = forward_and_grads(grouped_experts_forward, experts, x, index, weights)
    for name, g, w in zip(NAMES, got, want):
        assert rel_err(g, w) < 1e-2, (name, rel_err(g, w))


def test_row_ops_skip_out_of_range_rows_like_a_loop():
    """`hf_moe.moe.ops` on CPU: gather-sum counts entries at or past `offsets[-1]` (or past the end of `src`) as
    zero and sums the rest; gather copies rows by index, into `out` when given. Checked against Python loops."""
    from hf_moe.moe.ops import gather_rows, gather_sum

    src = torch.randn(9, 5, dtype=torch.float64)
    index = torch.tensor([[0, 8], [3, 9], [6, 12], [7, 2]])  # 9 and 12 point past src
    for offsets, valid in ((torch.tensor([4, 7], dtype=torch.int32), 7), (None, 9)):
        got = gather_sum(src, index, offsets)
        want = torch.stack([sum((src[j] for j in row.tolist() if j < valid), torch.zeros(5, dtype=torch.float64))
                            for row in index])
        assert torch.equal(got, want)
    assert torch.equal(gather_sum(src[:0], index), torch.zeros(4, 5, dtype=torch.float64))
    token = torch.tensor([5, 0, 5, 2])
    out = torch.zeros(4, 7, dtype=torch.float64)
    gather_rows(src, token, torch.tensor([4], dtype=torch.int32), out=out[:, :5])
    assert all(torch.equal(out[i, :5], src[t]) for i, t in enumerate(token.tolist())) and not out[:, 5:].any()


def test_override_plan_forces_fields_inside_the_block_only():
    from hf_moe.moe.experts.plan import override_plan, plan_experts

    experts = make_experts()
    x, weights = torch.randn(3, experts.hidden_dim, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    before = plan_experts(experts, x, weights, 6)
    assert before.gate_up_gemm == before.down_gemm == "per_expert" and not before.decode  # CPU
    with override_plan(decode=True, down_gemm="grouped_mm"):
        forced = plan_experts(experts, x, weights, 6)
        assert forced.decode and forced.down_gemm == "grouped_mm" and forced.gate_up_gemm == "per_expert"
    assert plan_experts(experts, x, weights, 6) == before
    with pytest.raises(ValueError, match="unknown names \\['decodes'\\]"):
        with override_plan(decodes=True):
            pass
