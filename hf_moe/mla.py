"""Multi-head latent attention (MLA, DeepSeek-V2/V3): the hf-moe attention when `HfMoeConfig.kv_lora_rank` is set.

Keys and values come from one low-rank latent per token: `kv_a_proj_with_mqa` maps the hidden state to a
`kv_lora_rank`-wide latent (RMS-normed) and one `qk_rope_head_dim`-wide RoPE key shared by every head; `kv_b_proj`
expands the latent into each head's non-rotary key part and its value. Queries go through their own normed
`q_lora_rank` latent, or one `q_proj`. The KV cache holds the latent and the rotated shared key, not the expanded
keys and values. With `index_topk`, a lightning indexer (`hf_moe.sparse_attention`) restricts each query to the keys
it ranks highest; its keys are cached after the shared key's. With `rope_parameters["llama_4_scaling_beta"]`
(Mistral-Small-4) the queries are scaled by Llama 4's position-dependent attention temperature. Parameter names are
DeepSeek's, so its checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.cache_utils import Cache

from .attention import HfMoeRMSNorm, apply_partial_rotary_pos_emb, attend
from .configuration_hf_moe import HfMoeConfig
from .sparse_attention import HfMoeLightningIndexer

LATENT_NORM_EPS = 1e-6
"""Epsilon of the two latent RMSNorms: DeepSeek's checkpoints were trained with it whatever `rms_norm_eps` says."""


def yarn_softmax_mscale(rope_parameters: dict | None) -> float:
    """The factor on MLA's softmax scale under RoPE scaling (DeepSeek-V3's YaRN context extension): `m²` with
    `m = 0.1·mscale_all_dim·ln(factor) + 1`; 1 for the default rope type, without `mscale_all_dim`, or for a
    `factor` ≤ 1."""
    params = rope_parameters or {}
    factor, mscale_all_dim = params.get("factor", 1.0), params.get("mscale_all_dim", 0)
    if params.get("rope_type", "default") == "default" or not mscale_all_dim or factor <= 1:
        return 1.0
    return (0.1 * mscale_all_dim * math.log(factor) + 1.0) ** 2


def llama_4_query_scale(rope_parameters: dict | None) -> tuple[float, int] | None:
    """`(β, L)` of Llama 4's attention temperature (Mistral-Small-4: `rope_parameters["llama_4_scaling_beta"]` and
    `["original_max_position_embeddings"]`), or None when the config sets no β."""
    params = rope_parameters or {}
    beta = params.get("llama_4_scaling_beta")
    return None if beta is None else (beta, params["original_max_position_embeddings"])


def scale_queries(queries: torch.Tensor, position_ids: torch.Tensor, beta: float, original: int) -> torch.Tensor:
    """Queries `[B, heads, S, ·]` times Llama 4's temperature `1 + β·ln(1 + ⌊position / L⌋)`: 1 inside the original
    context `L`, growing with the log of the number of contexts past it (sharper attention far out)."""
    scale = 1 + beta * torch.log(1 + torch.floor(position_ids / original))
    return queries * scale[:, None, :, None].to(queries.dtype)


class HfMoeMultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention with DeepSeek's parameter names; the attention kernel comes from transformers'
    attention interface (eager, sdpa, flex, flash) and the cache from transformers' `Cache`."""

    def __init__(self, config: HfMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.q_lora_rank = config.q_lora_rank  # read once: a config attribute costs µs of host time per read
        self.rope_interleave = config.rope_interleave
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.num_key_value_groups = 1  # every head has its own keys and values (expanded from the latent)
        self.scaling = self.qk_head_dim**-0.5 * yarn_softmax_mscale(config.rope_parameters)
        self.query_scale = llama_4_query_scale(config.rope_parameters)
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = HfMoeRMSNorm(config.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = HfMoeRMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=bias)
        self.indexer = HfMoeLightningIndexer(config) if config.index_topk is not None else None

    def project_queries(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The queries of every head and the normed query latent they come from (None without `q_lora_rank`)."""
        if self.q_lora_rank is None:
            return self.q_proj(hidden_states), None
        latent = self.q_a_layernorm(self.q_a_proj(hidden_states))
        return self.q_b_proj(latent), latent

    def rotate(
        self, q_rope: torch.Tensor, k_rope: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on the rotary parts (adjacent pairs with `rope_interleave`)."""
        cos, sin = position_embeddings
        return apply_partial_rotary_pos_emb(q_rope, k_rope, cos, sin, self.rope_interleave)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        queries, query_latent = self.project_queries(hidden_states)
        queries = queries.view(*input_shape, -1, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = queries.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        # One "head" each, [B, 1, S, ·], so that any transformers cache stores them as it stores keys and values.
        latent, k_rope = self.kv_a_layernorm(latent).unsqueeze(1), k_rope.unsqueeze(1)
        q_rope, k_rope = self.rotate(q_rope, k_rope, position_embeddings)
        if self.indexer is not None:  # the indexer's keys travel with the shared key, through any cache
            index_queries, index_keys = self.indexer.project(hidden_states, query_latent, position_embeddings)
            k_rope = torch.cat((k_rope, index_keys.to(k_rope.dtype)), dim=-1)
        if past_key_values is not None:
            latent, k_rope = past_key_values.update(latent, k_rope, self.layer_idx)
        if self.indexer is not None:
            k_rope, index_keys = k_rope.split([self.qk_rope_head_dim, self.indexer.head_dim], dim=-1)
            attention_mask = self.indexer.sparse_mask(hidden_states, index_queries, index_keys, attention_mask)

        kv = self.kv_b_proj(latent.squeeze(1))  # [B, S_kv, heads · (nope + v)]
        kv = kv.view(*kv.shape[:-1], -1, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, value_states = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key_states = torch.cat((k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        query_states = torch.cat((q_nope, q_rope), dim=-1)
        if self.query_scale is not None:
            query_states = scale_queries(query_states, kwargs["position_ids"], *self.query_scale)

        attn_output, attn_weights = attend(self, query_states, key_states, value_states, attention_mask, **kwargs)
        return self.o_proj(attn_output), attn_weights
