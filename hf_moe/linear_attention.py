"""Gated DeltaNet: the linear-attention token mixer of Qwen3-Next and Qwen3.5 (transformers' `qwen3_next`,
`qwen3_5`, `qwen3_5_moe`), computed as transformers computes it.

Per token: projections to queries, keys, values (one `in_proj_qkv`), an output gate (`in_proj_z`), a write
strength (`in_proj_b`, sigmoid) and a decay input (`in_proj_a`); a short causal depthwise convolution with SiLU over
the queries, keys and values; L2-normalised queries and keys (queries also scaled by `key_head_dim^-½`), each key
head serving `num_value_heads / num_key_heads` consecutive value heads; the log decay `−exp(A_log)·softplus(a +
dt_bias)`; the gated delta rule (`gated_delta_rule.py`); an RMSNorm per value head gated by SiLU(z); `out_proj`.

Parameter names are Qwen3.5's (separate projections), so its checkpoints map one to one; Qwen3-Next fuses and
interleaves them per key head (`in_proj_qkvz`, `in_proj_ba`), which `split_qwen3_next_projections` /
`fuse_qwen3_next_projections` convert exactly (rows move, no arithmetic).

The decode state is transformers' own per-layer container, `transformers.cache_utils.LinearAttentionLayer` (the layer
a `DynamicCache` or `StaticCache` builds for a `"linear_attention"` entry of `config.layer_types`): it keeps the
last `conv_kernel_size` convolution inputs and the float32 recurrent state, so `generate` needs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import LinearAttentionLayer

from .gated_delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

L2_NORM_EPS = 1e-6
"""Added to the squared norm of queries and keys before the inverse square root, as transformers' and FLA's code do."""


@dataclass(frozen=True)
class GatedDeltaNetSizes:
    """The sizes of one Gated DeltaNet mixer. transformers' Qwen3-Next/Qwen3.5 configs name them `hidden_size`,
    `linear_num_key_heads`, `linear_num_value_heads`, `linear_key_head_dim`, `linear_value_head_dim`,
    `linear_conv_kernel_dim`, `rms_norm_eps` (the gated norm's) and `hidden_act` (the convolution's activation).
    `chunk_size` is the chunked rule's block length (speed only, not the result)."""

    hidden_size: int
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel_size: int = 4
    norm_eps: float = 1e-6
    activation: str = "silu"
    chunk_size: int = 64

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_key_heads", "num_value_heads", "key_head_dim", "value_head_dim",
                     "conv_kernel_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GatedDeltaNetSizes.{name} must be a positive integer, got {value!r}")
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(f"GatedDeltaNetSizes.num_value_heads ({self.num_value_heads}) must be a multiple of "
                             f"num_key_heads ({self.num_key_heads}): each key head serves whole value heads")
        if self.activation not in ACT2FN:
            raise ValueError(f"GatedDeltaNetSizes.activation {self.activation!r} is not one of transformers' ACT2FN")

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the short convolution: queries, keys and values."""
        return 2 * self.key_dim + self.value_dim

    @property
    def value_heads_per_key_head(self) -> int:
        return self.num_value_heads // self.num_key_heads


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dimension, then times SiLU(gate); in float32 (float64 for float64 inputs), the weight
    applied in the input dtype as transformers' `Qwen3NextRMSNormGated` applies it."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        compute = torch.promote_types(dtype, torch.float32)
        x = x.to(compute)
        x = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return (x * F.silu(gate.to(compute))).to(dtype)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet with Qwen3.5's parameter names. `forward(hidden_states, attention_mask, cache_layer)`:

    - `attention_mask` `[B, T]` (1 = token, 0 = padding; None = no padding): padded positions' inputs are zeroed
      before the projections, as transformers does. From a zero state (a fresh prefill) left padding is then exact:
      a padded token writes nothing (zero key) and the convolution sees zeros, which is what it sees before the
      first token anyway.
    - `cache_layer`: a `LinearAttentionLayer`, read and updated in place; None without a cache. A call without
      previous state is a prefill (chunked rule from a zero state), a later call continues from the stored state.
    - One token at a time runs the recurrent rule, longer inputs the chunked one.
    """

    def __init__(self, sizes: GatedDeltaNetSizes) -> None:
        super().__init__()
        self.sizes = sizes
        hidden, heads = sizes.hidden_size, sizes.num_value_heads
        self.in_proj_qkv = nn.Linear(hidden, sizes.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, sizes.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, heads, bias=False)
        # Only its weight `[conv_dim, 1, K]` is used (the checkpoints' `conv1d.weight`): `short_convolution`
        # applies it to the cached window itself.
        self.conv1d = nn.Conv1d(sizes.conv_dim, sizes.conv_dim, sizes.conv_kernel_size, groups=sizes.conv_dim,
                                bias=False)
        self.dt_bias = nn.Parameter(torch.ones(heads))
        # Decay rates exp(A_log) drawn from (0.01, 16) as transformers' classes draw them; 0.01 keeps log finite.
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(0.01, 16).log())
        self.norm = GatedRMSNorm(sizes.value_head_dim, sizes.norm_eps)
        self.out_proj = nn.Linear(sizes.value_dim, hidden, bias=False)
        self.activation = ACT2FN[sizes.activation]

    def short_convolution(self, mixed: torch.Tensor, cache_layer: LinearAttentionLayer | None) -> torch.Tensor:
        """Causal depthwise convolution then the activation, `[B, T, C]` → `[B, T, C]`. With a cache, the window is
        the stored last inputs followed by the new ones (the cache layer keeps the window's last `K`)."""
        length, kernel = mixed.shape[1], self.sizes.conv_kernel_size
        window = mixed.transpose(1, 2)
        if cache_layer is not None:
            window = cache_layer.update_conv_state(window, conv_kernel_size=kernel)
        weight = self.conv1d.weight
        out = F.conv1d(F.pad(window.to(weight.dtype), (kernel - 1, 0)), weight, groups=weight.shape[0])
        return self.activation(out[..., -length:]).to(mixed.dtype).transpose(1, 2)

    def key_heads(self, x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        """`[B, T, key_dim]` → L2-normalised `[B, T, num_value_heads, key_head_dim]` in the compute dtype."""
        x = l2_normalize(x.reshape(*x.shape[:2], -1, self.sizes.key_head_dim).to(compute))
        return x.repeat_interleave(self.sizes.value_heads_per_key_head, dim=2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache_layer: LinearAttentionLayer | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        sizes, dtype = self.sizes, hidden_states.dtype
        if attention_mask is not None:
            if attention_mask.shape != (batch, length):
                raise ValueError(f"GatedDeltaNet: attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"the 2D padding mask of the current tokens {(batch, length)}")
            hidden_states = hidden_states * attention_mask[..., None].to(dtype)
        previous = cache_layer is not None and cache_layer.has_previous_state[0]
        recurrent_state = cache_layer.recurrent_states[0] if previous else None

        mixed = self.short_convolution(self.in_proj_qkv(hidden_states), cache_layer)
        query, key, value = mixed.split([sizes.key_dim, sizes.key_dim, sizes.value_dim], dim=-1)
        compute = torch.promote_types(dtype, torch.float32)
        query = self.key_heads(query, compute) * sizes.key_head_dim**-0.5
        key = self.key_heads(key, compute)
        value = value.reshape(batch, length, -1, sizes.value_head_dim).to(compute)
        beta = self.in_proj_b(hidden_states).sigmoid().to(compute)
        rate = F.softplus(self.in_proj_a(hidden_states).to(compute) + self.dt_bias.to(compute))
        log_decay = -self.A_log.to(compute).exp() * rate

        if length == 1:
            core, state = recurrent_gated_delta_rule(query, key, value, log_decay, beta, recurrent_state)
        else:
            core, state = chunk_gated_delta_rule(query, key, value, log_decay, beta, recurrent_state, sizes.chunk_size)
        if cache_layer is not None:
            cache_layer.update_recurrent_state(state)

        gate = self.in_proj_z(hidden_states).reshape(batch, length, -1, sizes.value_head_dim)
        out = self.norm(core.to(dtype), gate)
        return self.out_proj(out.reshape(batch, length, sizes.value_dim))


def _check_rows(name: str, tensor: torch.Tensor, rows: int) -> None:
    if tensor.dim() != 2 or tensor.shape[0] != rows:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected [{rows}, hidden_size]")


def split_qwen3_next_projections(
    in_proj_qkvz: torch.Tensor, in_proj_ba: torch.Tensor, sizes: GatedDeltaNetSizes
) -> dict[str, torch.Tensor]:
    """Qwen3-Next's fused projections → hf-moe's (Qwen3.5's) `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`.

    Qwen3-Next groups the rows per key head `h`: `in_proj_qkvz` holds, for each `h`, its query and key rows and then
    the value and gate rows of its `r = num_value_heads / num_key_heads` value heads; `in_proj_ba` holds, for each
    `h`, the `b` rows then the `a` rows of those value heads. hf-moe keeps all queries, then all keys, then all values
    (and z, b, a apart), each in head order. Rows are only reordered."""
    r, hk = sizes.value_heads_per_key_head, sizes.num_key_heads
    _check_rows("in_proj_qkvz", in_proj_qkvz, sizes.conv_dim + sizes.value_dim)
    _check_rows("in_proj_ba", in_proj_ba, 2 * sizes.num_value_heads)
    hidden = in_proj_qkvz.shape[1]
    vdim = r * sizes.value_head_dim
    q, k, v, z = in_proj_qkvz.reshape(hk, -1, hidden).split([sizes.key_head_dim, sizes.key_head_dim, vdim, vdim], 1)
    b, a = in_proj_ba.reshape(hk, 2 * r, hidden).split([r, r], 1)
    q, k, v, z, b, a = (x.reshape(-1, hidden) for x in (q, k, v, z, b, a))
    return {"in_proj_qkv": torch.cat([q, k, v]), "in_proj_z": z, "in_proj_b": b, "in_proj_a": a}


def fuse_qwen3_next_projections(
    in_proj_qkv: torch.Tensor,
    in_proj_z: torch.Tensor,
    in_proj_b: torch.Tensor,
    in_proj_a: torch.Tensor,
    sizes: GatedDeltaNetSizes,
) -> dict[str, torch.Tensor]:
    """hf-moe's (Qwen3.5's) projections → Qwen3-Next's `in_proj_qkvz`, `in_proj_ba`: the inverse of
    `split_qwen3_next_projections`."""
    _check_rows("in_proj_qkv", in_proj_qkv, sizes.conv_dim)
    _check_rows("in_proj_z", in_proj_z, sizes.value_dim)
    _check_rows("in_proj_b", in_proj_b, sizes.num_value_heads)
    _check_rows("in_proj_a", in_proj_a, sizes.num_value_heads)
    hidden, hk = in_proj_qkv.shape[1], sizes.num_key_heads
    q, k, v = in_proj_qkv.split([sizes.key_dim, sizes.key_dim, sizes.value_dim])
    per_key_head = [x.reshape(hk, -1, hidden) for x in (q, k, v, in_proj_z, in_proj_b, in_proj_a)]
    return {"in_proj_qkvz": torch.cat(per_key_head[:4], dim=1).reshape(-1, hidden),
            "in_proj_ba": torch.cat(per_key_head[4:], dim=1).reshape(-1, hidden)}
