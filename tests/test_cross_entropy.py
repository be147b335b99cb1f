"""The causal-LM loss (`hf_moe.loss`) and its fused cross-entropy (`hf_moe.moe.kernels.cross_entropy`).

Kernel tests run on a CUDA device, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with Triton
installed), and skip otherwise: loss and logits gradient against `F.cross_entropy` in float64 with transformers'
shift and reductions, for a vocabulary that is not a multiple of the block, ignored rows, every row ignored, an int or
tensor `num_items_in_batch`, `shift_labels`, a strided row layout, an upstream gradient other than 1, bf16 and fp32.
CPU tests (CI): `HfMoeForCausalLM`'s loss is transformers' `ForCausalLMLoss` off CUDA, its `loss_type` stays the one
the Trainer counts shifted labels for, and a user's `loss_function` or another `loss_type` wins. CUDA tests:
torch.compile(fullgraph=True) equals eager, and the model's training step equals transformers' loss at bf16
tolerance.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

import pytest
import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss, ForMaskedLMLoss

import hf_moe.loss
from hf_moe import HfMoeForCausalLM
from hf_moe.loss import causal_lm_loss

from .conftest import aot_graph_backend, count_calls, rel_err, requires_cuda, tiny_config

CUDA = torch.cuda.is_available()
requires_kernels = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)",
)
DEVICE = "cuda" if CUDA else "cpu"
fused_causal_lm_loss = functools.partial(causal_lm_loss, fused=True)  # the kernels, on the CPU too (interpreter)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
"""Relative error against float64: float32 arithmetic, and for bf16 the gradient's rounding to bf16."""


def _reference(logits, labels, num_items_in_batch=None, shift_labels=None, ignore_index=-100):
    """transformers' `ForCausalLMLoss` in float64 (its shift and reductions, `F.cross_entropy` on double logits)."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = logits.double().reshape(-1, logits.shape[-1])
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = nn.functional.cross_entropy(flat, shift_labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def _loss_and_grad(loss_fn, logits, labels, upstream=1.0, **kwargs):
    logits = logits.detach().requires_grad_(True)
    loss = loss_fn(logits, labels, logits.shape[-1], **kwargs) if loss_fn is not _reference else \
        _reference(logits, labels, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), logits.grad


def _check(logits, labels, upstream=1.0, **kwargs):
    """Fused loss and gradient against the float64 reference: loss at the dtype's tolerance, gradient of the same
    dtype as the logits and close to the reference."""
    loss, grad = _loss_and_grad(fused_causal_lm_loss, logits, labels, upstream, **kwargs)
    want_loss, want_grad = _loss_and_grad(_reference, logits, labels, upstream, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == logits.dtype and grad.shape == logits.shape
    tol = TOL[logits.dtype]
    assert abs(loss.double() - want_loss).item() <= tol * max(1.0, want_loss.abs().item()), (loss, want_loss)
    assert rel_err(grad, want_grad) <= tol, rel_err(grad, want_grad)


def _inputs(batch, seq, vocab, dtype, ignored=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, seq, vocab, generator=generator)).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[torch.rand(batch, seq, generator=generator) < ignored] = -100
    return logits, labels.to(DEVICE)


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [97, 4096 + 37])
def test_loss_and_gradient_match_float64(dtype, vocab):
    """One partial block (97) and a full block then a partial one (4133), with ignored rows, mean reduction. The
    first sequence's last logit is the largest, so its last block's max exceeds the first's (the running sum is
    rescaled)."""
    logits, labels = _inputs(2, 5, vocab, dtype, ignored=0.3)
    logits[0, :, -1] += 20
    _check(logits, labels)


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_num_items_in_batch_int_and_tensor_and_upstream_gradient(dtype):
    logits, labels = _inputs(2, 6, 300, dtype, ignored=0.2, seed=1)
    _check(logits, labels, upstream=2.5, num_items_in_batch=7)
    _check(logits, labels, upstream=-0.75, num_items_in_batch=torch.tensor(13, device=DEVICE))


@requires_kernels
def test_shift_labels_are_used_as_given():
    logits, labels = _inputs(2, 5, 130, torch.float32, seed=2)
    shift_labels = torch.randint(0, 130, (2, 5), device=DEVICE)
    shift_labels[0, 1] = -100
    _check(logits, labels, shift_labels=shift_labels)
    _check(logits, labels, shift_labels=shift_labels, num_items_in_batch=9)
    strided = torch.randint(0, 130, (1, 10), device=DEVICE)[:, ::2]  # flattens to a view of stride 2
    _check(logits[:1], labels[:1], shift_labels=strided)


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows(dtype):
    """Logits that are a slice of wider rows (row stride V + 11) are read in place; a slice along the sequence
    (not one stride over the rows) is copied by the reshape."""
    wide, labels = _inputs(2, 4, 200 + 11, dtype, ignored=0.2, seed=3)
    logits = wide[..., :200]
    labels = labels.clamp(max=199).masked_fill(labels < 0, -100)
    assert logits.reshape(-1, 200).stride(0) == 211
    _check(logits, labels)
    _check(wide[:, 1:, :200], labels[:, 1:], num_items_in_batch=5)


@requires_kernels
def test_every_row_ignored():
    """The mean over no rows is NaN (as `F.cross_entropy`'s); the sum over `num_items_in_batch` is 0. Either way the
    logits' gradient is 0."""
    logits, labels = _inputs(2, 3, 50, torch.float32)
    labels.fill_(-100)
    loss, grad = _loss_and_grad(fused_causal_lm_loss, logits, labels)
    assert torch.isnan(loss) and torch.isnan(_reference(logits, labels)) and not grad.any()
    for num_items in (4, torch.tensor(4, device=DEVICE)):
        loss, grad = _loss_and_grad(fused_causal_lm_loss, logits, labels, num_items_in_batch=num_items)
        assert loss.item() == 0.0 and _reference(logits, labels, num_items_in_batch=num_items).item() == 0.0
        assert not grad.any()


@requires_kernels
def test_target_out_of_range_gives_nan_and_extreme_logits_stay_exact():
    """An out-of-vocabulary target (not ignore_index) is reported as a NaN loss, with no host sync. A row whose first
    block is all -inf and whose other logits are far below 0 keeps an exact log-sum-exp."""
    from hf_moe.moe.kernels.cross_entropy import cross_entropy_rows

    logits, labels = _inputs(1, 3, 5000, torch.float32, seed=4)
    rows = cross_entropy_rows(logits[0], torch.tensor([1, 4999, 5000], device=DEVICE))
    assert torch.isfinite(rows[:2]).all() and torch.isnan(rows[2])
    logits[0, 0, :4096] = -float("inf")
    logits[0, 0, 4096:] -= 1000.0
    _check(logits, labels, shift_labels=torch.tensor([[4500, 4999, 7]], device=DEVICE))


@requires_kernels
def test_ops_pass_opcheck():
    from hf_moe.moe.kernels import cross_entropy  # noqa: F401  (registers the ops)

    logits = torch.randn(5, 70, device=DEVICE, dtype=torch.bfloat16)
    target = torch.tensor([0, 69, -100, 3, 12], device=DEVICE)
    torch.library.opcheck(torch.ops.hf_moe.cross_entropy_forward.default, (logits, target, -100))
    _, lse = torch.ops.hf_moe.cross_entropy_forward(logits, target, -100)
    grad = torch.randn(5, device=DEVICE)
    torch.library.opcheck(torch.ops.hf_moe.cross_entropy_backward.default, (logits, target, lse, grad, -100))


@requires_kernels
def test_compiled_loss_equals_eager():
    """fullgraph: the loss traces as the two ops, with the reductions around them, and computes what eager does up
    to the order of the reductions' sums (on the CPU under the interpreter through aot_eager: inductor would compile
    the ops' CPU fallback nowhere)."""
    logits, labels = _inputs(2, 6, 300, torch.bfloat16, ignored=0.2, seed=5)
    compiled = torch.compile(fused_causal_lm_loss, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(10, device=DEVICE)}):
        torch._dynamo.reset()
        loss, grad = _loss_and_grad(compiled, logits, labels, **kwargs)
        want_loss, want_grad = _loss_and_grad(fused_causal_lm_loss, logits, labels, **kwargs)
        assert rel_err(loss, want_loss) <= 1e-6 and rel_err(grad, want_grad) <= 1e-2  # one bf16 rounding


@requires_kernels
def test_compiled_backward_is_traced_for_fusion():
    """Under torch.compile the backward is torch ops, not the backward kernel's op, so that inductor fuses it with
    the other gradients that add into the logits (a model's returned logits); the forward stays the kernel. The
    result is checked against float64 with the gradient of the returned logits added."""
    backend, graphs = aot_graph_backend()

    def loss_and_logits(logits, labels):
        return fused_causal_lm_loss(logits, labels, logits.shape[-1]), logits * 1

    torch._dynamo.reset()
    compiled = torch.compile(loss_and_logits, fullgraph=True, backend=backend)
    logits, labels = _inputs(2, 6, 300, torch.float32, ignored=0.2, seed=6)
    extra = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    grads = []
    for fn in (compiled, lambda x, y: (_reference(x, y), x)):
        x = logits.detach().requires_grad_(True)
        loss, out = fn(x, labels)
        torch.autograd.backward((loss, out), (torch.tensor(1.0, dtype=loss.dtype, device=DEVICE),
                                              extra.to(out.dtype)))
        grads.append(x.grad)
    forward, backward = (str(graphs[kind][0]) for kind in ("forward", "backward"))
    assert "cross_entropy_forward" in forward
    assert "cross_entropy_backward" not in backward and "exp" in backward
    assert rel_err(grads[0], grads[1]) <= 1e-5


@requires_kernels
def test_model_trains_on_the_fused_loss(monkeypatch):
    """The model's `loss_function` runs the kernels (here on the CPU under the interpreter, as if Triton served it),
    and its loss and gradients equal those of transformers' `ForCausalLMLoss` (float32)."""
    from hf_moe.moe.kernels import cross_entropy

    monkeypatch.setattr(hf_moe.loss, "triton_serves", lambda tensor: True)
    calls = count_calls(monkeypatch, cross_entropy, "cross_entropy_rows")
    torch.manual_seed(0)
    fused = HfMoeForCausalLM(tiny_config()).to(DEVICE)
    reference = copy.deepcopy(fused)
    reference.loss_function = ForCausalLMLoss
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    labels = ids.masked_fill(torch.rand(ids.shape, device=DEVICE) < 0.2, -100)
    results = []
    for model in (fused, reference):
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(7, device=DEVICE))
        out.loss.backward()
        results.append({"loss": out.loss.detach(), **{n: p.grad for n, p in model.named_parameters()}})
    for key in results[1]:
        assert rel_err(results[0][key], results[1][key]) <= 1e-5, (key, rel_err(results[0][key], results[1][key]))
    assert calls == [1]


def test_model_loss_is_transformers_loss_off_cuda():
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(router_aux_loss_coef=0.0, router_z_loss_coef=0.0))
    # the Trainer counts num_items_in_batch over labels[..., 1:] for models whose loss_type maps to ForCausalLMLoss
    assert LOSS_MAPPING[model.loss_type] is ForCausalLMLoss and model.loss_function is causal_lm_loss
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids, labels=labels)
    assert torch.equal(out.loss, ForCausalLMLoss(out.logits, labels, 97))
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(11))
    assert torch.equal(out.loss, ForCausalLMLoss(out.logits, labels, 97, num_items_in_batch=torch.tensor(11)))


def test_user_loss_function_and_loss_type_are_honoured():
    model = HfMoeForCausalLM(tiny_config(router_aux_loss_coef=0.0, router_z_loss_coef=0.0))
    ids = torch.randint(0, 97, (1, 7))
    calls = []

    def mine(logits, labels, vocab_size, **kwargs):
        calls.append(vocab_size)
        return logits.float().mean() * 0 + 42.0

    model.loss_function = mine
    assert model(input_ids=ids, labels=ids).loss.item() == 42.0 and calls == [97]
    other = HfMoeForCausalLM(tiny_config())
    other.loss_type = "ForMaskedLM"
    assert other.loss_function is ForMaskedLMLoss


@pytest.mark.parametrize("choice", ["default", "user", "loss_type"])
def test_each_loss_choice_compiles_fullgraph(choice):
    """The `loss_function` property traces (transformers' choice is written out, not called through super())."""
    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config())
    if choice == "user":
        model.loss_function = ForCausalLMLoss
    elif choice == "loss_type":
        model.loss_type = "ForMaskedLM"
    ids = torch.randint(0, 97, (2, 9))
    torch._dynamo.reset()
    loss = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, labels=ids).loss
    assert torch.allclose(loss, model(input_ids=ids, labels=ids).loss, rtol=1e-5)


def test_fallback_and_switch_and_bad_vocab(monkeypatch):
    """Off CUDA (or with the switch off) `causal_lm_loss` is transformers' function itself; a vocab_size that is not
    the logits' last dimension is refused by name."""
    calls = []
    monkeypatch.setattr(hf_moe.loss, "ForCausalLMLoss", lambda *args, **kwargs: calls.append(1) or torch.zeros(()))
    logits, labels = torch.randn(1, 4, 10), torch.randint(0, 10, (1, 4))
    causal_lm_loss(logits, labels, 10)
    assert calls == [1]
    with pytest.raises(ValueError, match="vocab_size=11"):
        causal_lm_loss(logits, labels, 11)


@requires_cuda
def test_cuda_switch_selects_the_path(monkeypatch):
    calls = []
    monkeypatch.setattr(hf_moe.loss, "ForCausalLMLoss", lambda *args, **kwargs: calls.append(1) or torch.zeros(()))
    logits, labels = torch.randn(1, 4, 10, device="cuda"), torch.randint(0, 10, (1, 4), device="cuda")
    causal_lm_loss(logits, labels, 10)
    assert calls == []
    monkeypatch.setattr(hf_moe.loss, "FUSED_CROSS_ENTROPY", False)
    causal_lm_loss(logits, labels, 10)
    assert calls == [1]


@requires_cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_model_training_step_matches_transformers_loss(compiled, monkeypatch):
    """The bf16 model's loss and gradients with the fused loss (eager, or compiled) are no further from a float32
    reference with transformers' `ForCausalLMLoss` than the bf16 model with transformers' loss is (within a factor
    of 2 and a floor), and the fused kernels ran."""
    from hf_moe.moe.kernels import cross_entropy

    from .test_compile_cuda import cuda_config

    calls = count_calls(monkeypatch, cross_entropy, "cross_entropy_rows")
    torch.manual_seed(0)
    reference = HfMoeForCausalLM(cuda_config(router_aux_loss_coef=0.01)).to("cuda").train()
    fused = copy.deepcopy(reference).to(torch.bfloat16)
    baseline = copy.deepcopy(fused)
    reference.loss_function = baseline.loss_function = ForCausalLMLoss
    assert fused.loss_function is causal_lm_loss
    ids = torch.randint(0, 256, (2, 128), device="cuda")
    labels = ids.masked_fill(torch.rand(ids.shape, device="cuda") < 0.1, -100)
    torch._dynamo.reset()
    results = {}
    for name, model in (("reference", reference), ("baseline", baseline), ("fused", fused)):
        run = torch.compile(model) if compiled and name == "fused" else model
        out = run(input_ids=ids, labels=labels, num_items_in_batch=(labels[:, 1:] != -100).sum())
        out.loss.backward()
        results[name] = {"loss": out.loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}
    want = results["reference"]
    for key in want:
        fused_err, baseline_err = rel_err(results["fused"][key], want[key]), rel_err(results["baseline"][key],
                                                                                     want[key])
        assert fused_err <= max(2 * baseline_err, 1e-2), (key, fused_err, baseline_err)
    assert calls == [1]
