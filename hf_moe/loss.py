"""The causal-LM loss of [`HfMoeForCausalLM`]: transformers' `ForCausalLMLoss`, with its cross-entropy fused on CUDA.

transformers' function upcasts the logits to a float32 copy and runs `F.cross_entropy` on it. [`causal_lm_loss`]
computes the same loss (same arguments, shift, `ignore_index`, mean or sum over `num_items_in_batch`) with
`hf_moe.moe.kernels.cross_entropy`, which reads the logits in their own dtype and keeps one float32 per row: no
float32 copy of the logits, one read forward, one read and one write backward, and no host sync. Elsewhere (CPU, no
Triton, other dtypes, or `FUSED_CROSS_ENTROPY = False`) it is transformers' function itself.

[`FusedCausalLMLoss`] makes it [`HfMoeForCausalLM`]'s `loss_function` wherever transformers would pick
`ForCausalLMLoss` (the model's `loss_type` stays `"ForCausalLM"`, which the Trainer reads to count
`num_items_in_batch` over the shifted labels); a `loss_function` the user sets still wins.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

from .moe import kernels
from .moe.ops import triton_serves

FUSED_CROSS_ENTROPY = True
"""Whether [`causal_lm_loss`] uses the fused Triton cross-entropy where it can; set `hf_moe.loss.FUSED_CROSS_ENTROPY
= False` to run transformers' `ForCausalLMLoss` everywhere (an A/B switch; torch.compile recompiles on a change)."""


class FusedCausalLMLoss:
    """Mixin for a `PreTrainedModel` (listed before it): `loss_function` is [`causal_lm_loss`] where transformers'
    would be `ForCausalLMLoss` (for `loss_type="ForCausalLM"`, and as its fallback for an unknown one); one set by
    the user (`model.loss_function = f`) or another `loss_type`'s is kept."""

    @property
    def loss_function(self):
        if hasattr(self, "_loss_function"):
            return self._loss_function
        # transformers' choice, written out: torch.compile traces neither super().loss_function nor its fget
        loss_function = LOSS_MAPPING.get(getattr(self, "loss_type", None), ForCausalLMLoss)
        return causal_lm_loss if loss_function is ForCausalLMLoss else loss_function

    @loss_function.setter
    def loss_function(self, value) -> None:
        self._loss_function = value


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    fused: bool | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss`: the cross-entropy of `logits [..., V]` against `labels` shifted left by one
    (or `shift_labels` as given), `ignore_index` rows left out; the mean over the other rows, or their sum divided by
    `num_items_in_batch` when given (an int or a tensor). Float32.

    `fused=None` runs the Triton kernels where they serve the logits (CUDA, a supported dtype, `FUSED_CROSS_ENTROPY`
    set) and transformers' function elsewhere; `fused=True` runs the kernels wherever the tensors are (CUDA, or the
    CPU under Triton's interpreter). On the kernels the reductions are torch ops on the per-row losses, so dividing by
    a count or a tensor `num_items_in_batch` never reads a value on the host."""
    if logits.shape[-1] != vocab_size:
        raise ValueError(f"causal_lm_loss: logits have {logits.shape[-1]} columns but vocab_size={vocab_size}")
    if fused is None:
        fused = FUSED_CROSS_ENTROPY and triton_serves(logits) and logits.dtype in kernels.CROSS_ENTROPY_DTYPES
    if not fused:
        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs)
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device)
    rows = kernels.cross_entropy.cross_entropy_rows(logits.reshape(-1, vocab_size), target, ignore_index)
    total = rows.sum()
    if num_items_in_batch is None:  # F.cross_entropy's mean: NaN when every row is ignored
        return total / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
