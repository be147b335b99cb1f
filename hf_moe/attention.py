"""Attention, RoPE and RMSNorm of the hf-moe decoder: Llama's, with the biases (Llama / Qwen2), q/k norm per head
(Qwen3) or over the whole projection (OLMoE), before RoPE or after it (Hunyuan-MoE), partial rotary (GLM-4-MoE),
RoPE on adjacent pairs (ERNIE-4.5), sliding window on every layer (Mistral) or on some (`layer_types`: Qwen2,
GPT-OSS) and attention sinks (GPT-OSS) the config selects; attention kernels and masks come from transformers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_rope_utils import dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_hf_moe import HfMoeConfig
from .moe import kernels
from .moe.kernels.library import register_kernel_op
from .moe.ops import triton_serves

FUSED_NORM_ROPE = True
"""Whether q/k norm per head followed by RoPE (Qwen3's) runs as one Triton kernel each way on CUDA
(`hf_moe.moe.kernels.norm_rope`); False: torch's operators everywhere (an A/B switch; torch.compile recompiles on a
change)."""


class HfMoeRMSNorm(LlamaRMSNorm):
    """Llama's RMSNorm through torch's `rms_norm`: one fused kernel on CUDA (forward and backward) where Llama's
    eight operators each launch one, the same operators on the CPU. The weight scales the float32 normalised values
    before the one rounding to the input's dtype (Llama rounds them first): at most one unit in the last place in
    bf16, nothing in float32; float64 stays float64 (Llama's computes it in float32). A weight in another dtype than
    the input takes Llama's path, which promotes."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != hidden_states.dtype:
            return super().forward(hidden_states)
        return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def _rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's RoPE cosines and sines `[..., 2·len(inv_freq)]` of `position_ids`, computed in float32 (each angle is
    one product, as in Llama's) and scaled, then rounded to `dtype`."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def _rotary_cos_sin_fake(position_ids, inv_freq, scaling, dtype):
    shape = (*position_ids.shape, 2 * inv_freq.shape[-1])
    return position_ids.new_empty(shape, dtype=dtype), position_ids.new_empty(shape, dtype=dtype)


# One opaque node under torch.compile: its `[B, S, D]` outputs are computed once per forward and read by every
# layer. As plain operators, inductor fuses them into each layer's q/k norm and RoPE kernels and evaluates the
# cosines and sines again for every head, in forward and in backward (docs/decisions/compile.md, "RoPE's cosines
# and the loss's backward under compile").
rotary_cos_sin = register_kernel_op("rotary_cos_sin", _rotary_cos_sin, _rotary_cos_sin_fake)


class HfMoeRotaryEmbedding(LlamaRotaryEmbedding):
    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama's `(cos, sin)` in `x`'s dtype, from the custom op `hf_moe::rotary_cos_sin` (see above)."""
        return rotary_cos_sin(position_ids, self.inv_freq, float(self.attention_scaling), x.dtype)

    @staticmethod
    def compute_default_rope_parameters(config: HfMoeConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Llama's inverse frequencies over the `config.rotary_dim` rotated dimensions of a head (all of them unless
        `rope_parameters["partial_rotary_factor"]` < 1)."""
        dim = config.rotary_dim
        base = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq.to(device), 1.0


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """`(x0, x1, x2, x3, …)` → `(x0, x2, …, x1, x3, …)`: RoPE on adjacent pairs becomes RoPE on the two halves."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def apply_partial_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on the first `cos.shape[-1]` dimensions of each head; the others pass through unchanged. The rotated
    pairs are the two halves of those dimensions, or adjacent pairs `(x0, x1), (x2, x3), …` when `interleave`: these
    are laid out as halves first, in queries and keys alike, so that their dot products are those of RoPE on
    adjacent pairs."""
    rotary_dim = cos.shape[-1]
    q_rot, k_rot = q[..., :rotary_dim], k[..., :rotary_dim]
    if interleave:
        q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
    q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
    if rotary_dim == q.shape[-1]:
        return q_rot, k_rot
    return torch.cat([q_rot, q[..., rotary_dim:]], dim=-1), torch.cat([k_rot, k[..., rotary_dim:]], dim=-1)


# SDPA's backends without cuDNN's: cuDNN builds an execution plan for every new shape (tens of milliseconds on the
# host), and eager inference meets a new key length at every decode step. docs/decisions/decode-attention.md.
_SHAPE_STABLE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def inference_sdpa_backends(implementation: str, states: torch.Tensor) -> contextlib.AbstractContextManager:
    """Eager CUDA inference through SDPA leaves cuDNN's backend out; training (fixed shapes) and compiled code
    (static shapes, traced once) keep torch's choice. `implementation` is the config's `_attn_implementation`,
    `states` the tensors attended over. Entered once around all layers by the model (each entry costs host time)
    and by `attend` for a module called on its own; nothing to do where cuDNN's backend is off already."""
    if (
        implementation != "sdpa"
        or not states.is_cuda
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or not torch.backends.cuda.cudnn_sdp_enabled()
    ):
        return contextlib.nullcontext()
    return sdpa_kernel(_SHAPE_STABLE_SDPA)


MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
"""transformers' mask function of each attention type `HfMoeConfig.layer_types` names."""


def causal_masks(
    config: HfMoeConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | dict | None,
    past_key_values: Cache | None,
    position_ids: torch.Tensor | None,
    causal_only: bool = False,
    **mask_kwargs,
) -> dict[str, torch.Tensor | None]:
    """The mask of each attention type among the config's layers, as transformers' models build them (the padding
    mask, the cache's length and, for sliding layers, the window): `{layer type: mask}`. A dict (the masks `generate`
    prepared for a static cache) is returned as it is.

    `causal_only`: the caller was given no padding mask, cache or positions, so each query sees the keys up to its
    own. SDPA's full-attention layers then get None, SDPA's built-in causal mask, as transformers' masks give in eager
    code; under torch.compile (torch < 2.14) they would materialise the `[S, S]` mask, which SDPA's kernels apply
    over the whole square instead of skipping the masked half (docs/decisions/compile.md)."""
    if isinstance(attention_mask, dict):
        return attention_mask
    sdpa_causal = causal_only and config._attn_implementation == "sdpa"
    return {
        kind: None if sdpa_causal and kind == "full_attention" else MASK_FUNCTIONS[kind](
            config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=position_ids, **mask_kwargs)
        for kind in dict.fromkeys(config.attention_layer_types)
    }


def masks_for_generate(
    config: HfMoeConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_key_values: Cache | None,
    position_ids: torch.Tensor | None = None,
    or_mask_function: Callable | None = None,
    and_mask_function: Callable | None = None,
    block_sequence_ids: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | dict[str, torch.Tensor | None] | None:
    """`causal_masks` as `generate` asks for them (`HfMoeForCausalLM.create_masks_for_generate`): the one mask of a
    model whose layers share one attention type (a tensor, which a CUDA-graph decode step takes as an input), else
    `{layer type: mask}`; the arguments of transformers' mask functions only."""
    masks = causal_masks(config, inputs_embeds, attention_mask, past_key_values, position_ids,
                         or_mask_function=or_mask_function, and_mask_function=and_mask_function,
                         block_sequence_ids=block_sequence_ids)
    return next(iter(masks.values())) if len(masks) == 1 else masks


def sink_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    sinks: torch.Tensor,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with a sink (GPT-OSS): each head's softmax over a query's scores has one more column, the head's
    learned logit `sinks[h]`, whose value is zero, so the weights over the keys sum to less than 1. Written out
    (scores, softmax in float32, weighted sum): no SDPA backend takes a sink (docs/decisions/attention-sinks.md).
    The query heads of one key/value head are multiplied with it as one block of rows, never with copies of it.

    `attention_mask` is transformers' additive (eager) or boolean (sdpa) mask `[B, 1 or heads, Q, K]`, or None,
    which transformers passes to SDPA for its top-left causal mask (key j seen by query i iff j ≤ i; a single query
    sees every key). Returns (output `[B, Q, heads, v_dim]`, weights over the keys `[B, heads, Q, K]`)."""
    batch, heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, groups * q_len, -1), key.transpose(-1, -2)) * scaling
    scores = scores.view(batch, kv_heads, groups, q_len, kv_len)
    if attention_mask is None and q_len > 1:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        if attention_mask.dim() == 4:  # [B, 1 or heads, Q, K] → broadcastable over [B, kv_heads, groups, Q, K]
            attention_mask = attention_mask.unflatten(1, (-1, groups) if attention_mask.shape[1] > 1 else (1, 1))
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    sink = sinks.to(scores.dtype).view(1, kv_heads, groups, 1, 1).expand(batch, -1, -1, q_len, 1)
    weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    weights = F.dropout(weights, p=dropout, training=module.training).to(value.dtype)
    output = torch.matmul(weights.reshape(batch, kv_heads, groups * q_len, kv_len), value)
    return output.view(batch, heads, q_len, -1).transpose(1, 2), weights.reshape(batch, heads, q_len, kv_len)


SINK_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
"""Attention implementations that run a model with sinks: hf-moe's `sink_attention_forward` for eager and sdpa,
transformers' flex attention (which takes them as `s_aux`; not on the CPU)."""


def attend(
    module: nn.Module,
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sinks: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of `[B, heads, S, ·]` queries, keys and values through transformers' attention interface (the kernel
    `module.config._attn_implementation` names), with the module's `scaling` and, in training, its
    `attention_dropout`: (output `[B, S, heads · v_dim]`, attention weights or None). With `sinks` (one logit per
    head), eager and sdpa run `sink_attention_forward`, flex attention gets them as `s_aux`; other kernels are
    refused (transformers' flash-attention wrapper drops a sink its kernel does not take)."""
    implementation = module.config._attn_implementation
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    if sinks is not None:
        if implementation not in SINK_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={implementation!r} cannot run attention sinks "
                             f"(HfMoeConfig.attention_sinks=True): expected one of {SINK_IMPLEMENTATIONS}.")
        if implementation == "flex_attention":
            kwargs["s_aux"] = sinks
        else:
            attention_interface, kwargs["sinks"] = sink_attention_forward, sinks
    with inference_sdpa_backends(implementation, query_states):
        attn_output, attn_weights = attention_interface(
            module,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not module.training else module.attention_dropout,
            scaling=module.scaling,
            **kwargs,
        )
    return attn_output.reshape(*attn_output.shape[:-2], -1).contiguous(), attn_weights


class HfMoeAttention(nn.Module):
    """Grouped-query attention with RoPE (possibly partial, possibly on adjacent pairs), optional biases (Llama /
    Qwen2), q/k norm per head before RoPE (Qwen3) or after it (Hunyuan-MoE) or per projection (OLMoE), a sliding
    window when the layer's type is `"sliding_attention"`, optional sinks (`sinks [heads]`, GPT-OSS's name)."""

    def __init__(self, config: HfMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        scale = config.attention_multiplier  # Granite's; else Llama's
        self.scaling = self.head_dim**-0.5 if scale is None else scale
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        sliding = config.attention_layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if sliding else None
        self.rope_interleave = config.rope_interleave  # read once: a config attribute costs µs of host time per read
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )
        self.qk_norm_per_projection = config.qk_norm and config.qk_norm_scope == "projection"
        self.qk_norm_after_rope = config.qk_norm and config.qk_norm_order == "after_rope"
        self.qk_norm_per_head = config.qk_norm and not self.qk_norm_per_projection and not self.qk_norm_after_rope
        if config.qk_norm:
            per_head = not self.qk_norm_per_projection
            q_width = self.head_dim if per_head else config.num_attention_heads * self.head_dim
            k_width = self.head_dim if per_head else config.num_key_value_heads * self.head_dim
            self.q_norm = HfMoeRMSNorm(q_width, eps=config.rms_norm_eps)
            self.k_norm = HfMoeRMSNorm(k_width, eps=config.rms_norm_eps)
        # the norm-then-RoPE pattern the fused kernel computes: per head, Llama's RoPE on every dimension
        self.norm_rope_fusable = (
            self.qk_norm_per_head and not self.rope_interleave and config.rotary_dim == self.head_dim
            and self.head_dim & (self.head_dim - 1) == 0
        )
        self.sinks = nn.Parameter(torch.empty(config.num_attention_heads)) if config.attention_sinks else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query_states, key_states = self.queries_keys(hidden_states, *position_embeddings)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        sinks = self.sinks
        if hasattr(sinks, "to_local"):  # sharded by head under transformers' tensor parallelism (a DTensor)
            sinks = sinks.to_local()
        attn_output, attn_weights = attend(self, query_states, key_states, value_states, attention_mask, sinks,
                                           sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(attn_output), attn_weights

    def queries_keys(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys `[B, heads, S, D]`: projected, normed and rotated as the config says."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query_states, key_states = self.q_proj(hidden_states), self.k_proj(hidden_states)
        if self.fuses_norm_rope(query_states, cos):
            q_norm, k_norm, norm_rope = self.q_norm, self.k_norm, kernels.norm_rope.norm_rope
            query_states = norm_rope(query_states.view(hidden_shape), q_norm.weight, cos, sin, q_norm.variance_epsilon)
            key_states = norm_rope(key_states.view(hidden_shape), k_norm.weight, cos, sin, k_norm.variance_epsilon)
            return query_states.transpose(1, 2), key_states.transpose(1, 2)
        if self.qk_norm_per_projection:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.view(hidden_shape), key_states.view(hidden_shape)
        if self.qk_norm_per_head:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        query_states, key_states = apply_partial_rotary_pos_emb(
            query_states, key_states, cos, sin, self.rope_interleave
        )
        if self.qk_norm_after_rope:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        return query_states, key_states

    def fuses_norm_rope(self, states: torch.Tensor, cos: torch.Tensor) -> bool:
        """Whether the q/k norm and RoPE run as one kernel (`hf_moe.moe.kernels.norm_rope`): the pattern it computes,
        on CUDA with Triton, plain weights (not a tensor-parallel DTensor) in the states' dtype, `[B, S, D]` cos."""
        if not (FUSED_NORM_ROPE and self.norm_rope_fusable and triton_serves(states) and cos.dim() == 3):
            return False
        q_weight, k_weight = self.q_norm.weight, self.k_norm.weight
        return (
            q_weight.dtype == k_weight.dtype == states.dtype
            and not hasattr(q_weight, "to_local") and not hasattr(k_weight, "to_local")
        )
