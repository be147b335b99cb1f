"""`--verify`: the dense source and the upcycled model, side by side on random tokens, layer by layer, in float32."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_moe import HfMoeConfig

from .layerwise import LayerwiseModel
from .safetensors_io import SafetensorsReader
from .sources import DenseSource
from .upcycle_types import VerifyResult


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@torch.no_grad()
def verify_upcycle(source: DenseSource | str | Path, output: str | Path, *, expect_equal: bool = True,
                   reason: str = "", batch_size: int = 2, seq_len: int = 64, seed: int = 0,
                   progress: bool = True) -> VerifyResult:
    """Compare the dense checkpoint `source` with the upcycled checkpoint `output` on random token batches.

    `expect_equal` says whether the conversion was function-preserving (then `passed` requires a relative
    logit difference ≤ 1e-5); otherwise `reason` says why the function changes. The dense weights are
    rounded to the output's dtype first, so a dtype change is not counted as a difference. Memory: one
    dense and one MoE layer in float32 at a time (E·3·H·I/G·4 bytes for the MoE layer), plus the embedding
    and LM head in float32.
    """
    if not isinstance(source, DenseSource):
        source = DenseSource.open(source)
    reader = SafetensorsReader(output)
    moe = LayerwiseModel(HfMoeConfig.from_pretrained(output), reader)
    dense = LayerwiseModel(source.dense_config(), source.reader,
                           weight_dtype=reader.tensors["model.embed_tokens.weight"].dtype)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, moe.config.vocab_size, (batch_size, seq_len), generator=generator)
    h_dense, h_moe = dense.embed(ids), moe.embed(ids)
    layer_rel = []
    for i in tqdm(range(moe.config.num_hidden_layers), desc="verifying layers", disable=not progress):
        h_dense = dense.apply(dense.layer(i), h_dense)
        h_moe = moe.apply(moe.layer(i), h_moe)
        layer_rel.append(_rel(h_moe, h_dense))
    logits_dense, logits_moe = dense.logits(h_dense), moe.logits(h_moe)
    return VerifyResult(
        max_abs=(logits_moe - logits_dense).abs().max().item(),
        max_rel=_rel(logits_moe, logits_dense),
        layer_rel=layer_rel,
        num_tokens=ids.numel(),
        expect_equal=expect_equal,
        reason=reason,
    )
