"""SDPA backend choice of the hf-moe attention on CUDA (skipped without a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from hf_moe import HfMoeForCausalLM

from .conftest import tiny_config

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
    out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen and not any(seen), seen
    assert torch.equal(out[:, 7], first_token)
    seen.clear()
    model.train()
    model(ids, labels=ids).loss.backward()
    assert seen and all(seen), seen
