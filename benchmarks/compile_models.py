"""The model pairs `python -m benchmarks compile` measures: transformers' own MoE model and `HfMoeForCausalLM` holding
the same weights, and the check that they compute the same function.

The weights move from transformers' model to hf-moe's through hf-moe's foreign-checkpoint import (`hf_moe.interop`,
the path `HfMoeForCausalLM.from_pretrained(folder)` takes for a transformers checkpoint folder): the transformers
model is saved to a temporary folder (safetensors) and loaded back, so no tensor name is mapped by hand here. On a
GPU this adds the time to write and read the weights once (a few GB).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from copy import deepcopy
from unittest import mock

import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

import hf_moe.attention
import hf_moe.loss
from hf_moe import HfMoeForCausalLM
from hf_moe.attention import HfMoeRMSNorm, HfMoeRotaryEmbedding
from hf_moe.interop import FAMILIES
from hf_moe.moe.experts.plan import override_plan

# `model_type` + the family's transformers config fields; `layers`: the default number of decoder layers.
SHAPES = {
    "qwen3": dict(  # Qwen3-30B-A3B's layer
        model_type="qwen3_moe", layers=4, hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
        num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=32000, norm_topk_prob=True, max_position_embeddings=4096),
    "mixtral": dict(  # Mixtral-8x7B's layer (1.45 B parameters, 1.41 B of them experts; no q/k norm)
        model_type="mixtral", layers=2, hidden_size=4096, intermediate_size=14336, num_local_experts=8,
        num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000,
        rope_parameters=dict(rope_type="default", rope_theta=1e6), max_position_embeddings=4096),
}
TINY = {  # --tiny: CPU smoke runs of the same architectures
    "qwen3": dict(SHAPES["qwen3"], hidden_size=64, moe_intermediate_size=32, intermediate_size=96, num_experts=8,
                  num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512),
    "mixtral": dict(SHAPES["mixtral"], hidden_size=64, intermediate_size=96, num_local_experts=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512),
}
# hf-moe variants: `models["hf-moe"]` trained inside a context that changes one thing, an A/B in one run.
VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    # the weight gradients on torch's grouped GEMM, not quack's
    "hf-moe-no-quack": lambda: override_plan(quack=False),
    # transformers' ForCausalLMLoss (a float32 copy of the logits, inductor's kernels), not the fused cross-entropy
    "hf-moe-unfused-loss": lambda: mock.patch.object(hf_moe.loss, "FUSED_CROSS_ENTROPY", False),
    # RoPE's cosines from Llama's operators, which inductor fuses into every layer, not hf-moe's one custom op
    "hf-moe-llama-rope": lambda: mock.patch.object(HfMoeRotaryEmbedding, "forward", LlamaRotaryEmbedding.forward),
    # q/k norm and RoPE from torch's operators (inductor's kernels under compile), not hf-moe's fused kernel
    "hf-moe-unfused-norm-rope": lambda: mock.patch.object(hf_moe.attention, "FUSED_NORM_ROPE", False),
    # the fused gate/up + SwiGLU kernel with two accumulators at every width (one accumulator up to 4096 inputs)
    "hf-moe-two-acc": lambda: mock.patch("hf_moe.moe.kernels.grouped_gemm.ONE_ACCUMULATOR_MAX_K", 0),
}
# Relative L2 error of the logits the two models may differ by: float32 is the same function up to rounding; bfloat16
# runs other kernels in other orders (a wrong weight would give an error near 1).
LOGITS_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def build_models(shape: dict, layers: int, device: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """{"hf-moe": ..., "transformers": ...}: the family's transformers model with random weights, and hf-moe's model
    imported from it (see the module docstring); both on `device` in `dtype`, sharing no storage."""
    fields = {k: v for k, v in shape.items() if k not in ("model_type", "layers")}
    family = FAMILIES[shape["model_type"]]
    config = family.foreign_config(**fields, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device(device):
        peer = getattr(transformers, family.architecture)(config).to(dtype)
    with tempfile.TemporaryDirectory(prefix="hf-moe-compile-") as folder:
        peer.save_pretrained(folder)
        ours = HfMoeForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
    return {"hf-moe": ours, "transformers": peer}


def with_llama_norms(model: HfMoeForCausalLM) -> HfMoeForCausalLM:
    """A copy of `model` whose RMSNorms are transformers' `LlamaRMSNorm` (eight operators each, the normalised
    values rounded to the input's dtype before the weight), as hf-moe's were before they became torch's fused
    `rms_norm`: the `hf-moe-llama-norm` model, an A/B of that change in one process."""
    copy = deepcopy(model)
    for module in copy.modules():
        if isinstance(module, HfMoeRMSNorm):
            module.__class__ = LlamaRMSNorm  # the parent class: same parameters and attributes, Llama's forward
    return copy


@torch.no_grad()
def logits_check(models: dict[str, torch.nn.Module], device: str) -> dict:
    """Row `logits_rel_err`: ‖hf-moe − transformers‖ / ‖transformers‖ of the logits of 2 × 32 random tokens,
    against the tolerance of the models' dtype."""
    ours, peer = models["hf-moe"], models["transformers"]
    dtype = next(ours.parameters()).dtype
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), device=device,
                        generator=torch.Generator(device).manual_seed(3))
    modes = {m: m.training for m in (ours, peer)}
    try:
        for model in modes:
            model.eval()
        a, b = ours(input_ids=ids).logits.double(), peer(input_ids=ids).logits.double()
    finally:
        for model, training in modes.items():
            model.train(training)
    err = ((a - b).norm() / b.norm()).item()
    tol = LOGITS_TOLERANCE[dtype]
    return {"what": "logits_rel_err", "value": err, "tolerance": tol, "dtype": str(dtype).removeprefix("torch."),
            "ok": err <= tol}


def training_cases(models: dict, peer_attention: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(model name, attention kernel or None for the model's own): every model, then transformers' model with each
    kernel of `peer_attention` (its fastest configuration is the one hf-moe is compared with)."""
    return [(name, None) for name in models] + [("transformers", a) for a in peer_attention if "transformers" in models]


def case_name(name: str, attention: str | None) -> str:
    return f"{name}-{attention}" if attention else name


@contextlib.contextmanager
def training_step(models: dict, name: str, ids: torch.Tensor, attention: str | None = None,
                  compiled: bool = True) -> Iterator[Callable[[], None]]:
    """A training step of `models[name]` on `ids` (labels = inputs), compiled or eager, with `attention` as its
    attention kernel and, for a variant (`VARIANTS`), inside its context; the model's attention and eval mode come
    back after."""
    model = models[name].train()
    default_attention = model.config._attn_implementation
    model.set_attn_implementation(attention or default_attention)
    run = torch.compile(model) if compiled else model
    variant = VARIANTS.get(name, contextlib.nullcontext)

    def step() -> None:
        with variant():
            run(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        yield step
    finally:
        model.set_attn_implementation(default_attention)
        model.eval()
