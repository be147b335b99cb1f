"""The models `upcycling-quality` compares: the variants (a-e), the dense base, the MoE trained from scratch, and the
MoE that hf-moe's converter upcycles from the base checkpoint."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Variant:
    label: str
    upcycle: dict | None = None  # UpcycleConfig fields; None: not upcycled
    scratch: bool = False


VARIANTS = {
    "a": Variant("dense, continued"),
    "b": Variant("upcycled, 8 experts top-2 (copy)", dict(num_experts=8, top_k=2, init="copy")),
    "c": Variant("drop-upcycled r=0.5, 8 experts top-2", dict(num_experts=8, top_k=2, init="drop:0.5")),
    "d": Variant("virtual groups G=4: 32 experts top-4 + shared", dict(num_experts=32, top_k=4, granularity=4,
                                                                       shared_experts=4)),
    "e": Variant("MoE 8 experts top-2 from scratch (N+M tokens)", scratch=True),
}


def model_kind(key: str) -> str:
    """The model kind of variant `key`, which sets its speed: dense, MoE 8x top-2, or the virtual-group MoE."""
    return "dense" if key == "a" else ("moe-fine" if key == "d" else "moe")


def dense_model(args: argparse.Namespace, vocab_size: int, eos: int):
    """The dense Llama every run starts from (tied embeddings, full attention heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=True, eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    return LlamaForCausalLM(config)


def scratch_moe(base_dir: str, aux_coef: float):
    """Variant e: the MoE of b (8 experts top-2) with the base's attention and norms, freshly initialised."""
    from conversions.sources import DenseSource
    from hf_moe import HfMoeConfig, HfMoeForCausalLM

    fields = DenseSource.open(base_dir).hf_moe_fields  # exactly the dense model's attention and norms
    config = HfMoeConfig(**fields, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                         router_aux_loss_coef=aux_coef)
    return HfMoeForCausalLM(config)


def upcycled_moe(base_dir: str, out: str, variant: Variant, seed: int, aux_coef: float):
    """`variant` converted from the dense checkpoint `base_dir` into `out` by `conversions.upcycle`, and loaded."""
    from conversions import UpcycleConfig, upcycle
    from hf_moe import HfMoeForCausalLM

    result = upcycle(base_dir, out, UpcycleConfig(**variant.upcycle, seed=seed, overwrite=True, progress=False))
    model = HfMoeForCausalLM.from_pretrained(out, dtype=torch.float32, router_aux_loss_coef=aux_coef)
    return model, result
