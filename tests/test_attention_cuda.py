"""SDPA backend choice of the hf-moe attention on CUDA, attention sinks and mixed full / sliding layers on CUDA's
kernels (skipped without a GPU)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_moe import HfMoeForCausalLM

from .conftest import assert_rel_close, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_eager_inference_attention_leaves_cudnn_out_and_training_keeps_it(monkeypatch):
    """cuDNN's SDPA builds a plan per new key length, which eager decoding meets at every step: inference runs
    without that backend and gives the same tokens; training keeps torch's choice."""
    seen: list[bool] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    torch.manual_seed(0)
    model = HfMoeForCausalLM(tiny_config(attn_implementation="sdpa")).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), device="cuda")
    with torch.no_grad():
        first_token = model(ids).logits[:, -1].argmax(-1)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                         cache_implementation="dynamic")
    assert seen and not any(seen), seen
    assert torch.equal(out[:, 7], first_token)
    seen.clear()
    model.train()
    model(ids, labels=ids).loss.backward()
    assert seen and all(seen), seen


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_rms_norm_is_one_fused_operator_with_float64_outputs_and_gradients(dtype, contiguous):
    """On CUDA the decoder's RMSNorm issues one operator (torch's fused `rms_norm`, where Llama's issues eight), and
    its output and gradients equal the float64 formula's to the dtype's rounding, also for rows of a wider tensor
    (MLA normalises a slice of its latent projection)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hf_moe.attention import HfMoeRMSNorm

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    norm = HfMoeRMSNorm(256, eps=1e-6).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(256))
    wide = (3 * torch.randn(2, 7, 256 if contiguous else 320, device="cuda")).to(dtype).requires_grad_(True)
    x = wide[..., :256]
    with torch.no_grad(), Ops() as ops:
        norm(x)
    assert ops.seen[-1:] == ["aten._fused_rms_norm"] and len(ops.seen) <= (1 if contiguous else 2), ops.seen

    x64, w64 = x.detach().double().requires_grad_(True), norm.weight.detach().double().requires_grad_(True)
    expected = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    out = norm(x)
    out.backward(grad.to(dtype))
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want in ((out, expected), (wide.grad[..., :256], x64.grad), (norm.weight.grad, w64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < tol


@pytest.mark.parametrize("attn_implementation,dtype,tol", [
    ("sdpa", torch.bfloat16, 5e-2), ("sdpa", torch.float32, 1e-4), ("eager", torch.float32, 1e-4),
    ("flex_attention", torch.float32, 1e-4),
])
def test_cuda_sinks_with_mixed_layers_equal_the_float64_model(attn_implementation, dtype, tol):
    """A left-padded batch through a model with sinks, a sliding and a full layer: hf-moe's sink softmax (eager,
    sdpa) and transformers' flex attention with `s_aux` on CUDA compute the float64 CPU model's logits; in float32 a
    static cache decodes the same tokens and logits as the dynamic one."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=64, head_dim=16, attention_sinks=True, attention_bias=True, sliding_window=3,
                         layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")
    reference = HfMoeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    model = copy.deepcopy(reference).to("cuda", dtype)
    model.set_attn_implementation(attn_implementation)
    reference.double()
    ids = torch.randint(1, config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        got = model(ids.cuda(), attention_mask=mask.cuda()).logits.cpu()
    assert_rel_close(got[0, 2:], want[0, 2:], tol, "left-padded row")
    assert_rel_close(got[1], want[1], tol, "unpadded row")
    if attn_implementation == "flex_attention" or dtype != torch.float32:  # bf16 greedy may rightly flip a near-tie
        return
    kwargs = dict(attention_mask=mask.cuda(), max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True, output_logits=True)
    dynamic = model.generate(ids.cuda(), cache_implementation="dynamic", **kwargs)
    static = model.generate(ids.cuda(), cache_implementation="static", disable_compile=True, **kwargs)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert_rel_close(torch.stack(static.logits), torch.stack(dynamic.logits), 1e-5, "static vs dynamic cache")
