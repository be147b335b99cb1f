"""DeepSeek sparse attention (DSA; DeepSeek-V3.2, GLM-5): multi-head latent attention (`hf_moe.mla`) in which each
query attends only to the `index_topk` keys a lightning indexer ranks highest; the others are masked.

The indexer has projections of its own. Queries: `index_n_heads` heads of `index_head_dim` from MLA's normed query
latent (`wq_b`). Keys: one per token, `k_norm(wk(x))` (a LayerNorm). RoPE rotates the first `qk_rope_head_dim`
dimensions of both, the two halves of them or adjacent pairs (`indexer_rope_interleave`). The score of key `t` for
query `s` is `Σ_h w_h(s)·relu(q_h(s)·k(t)/√index_head_dim)`, with the per-token head weights
`w(s) = weights_proj(x_s)/√index_n_heads`, all in float32. Keys the attention mask hides score -inf; each query keeps
the `index_topk` best keys, of tied scores (ReLUs at 0 tie often) the lower-index ones, whatever the number of keys, so
a static cache's unwritten slots change nothing; the kept keys' mask entries are left as they are, every other key is
masked. With at most `index_topk` keys, every key is kept and the mask is the attention's own.

As in transformers' DeepSeek-V3.2 and GLM-MoE-DSA, the indexer runs without gradients: the language-model loss trains
the attention through the selection, never the indexer (DeepSeek trains it with a separate loss, not implemented
here). Its keys are cached with MLA's rotated shared key, so a cached decoding step ranks the keys a forward over the
whole sequence ranks. docs/decisions/sparse-attention.md.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .attention import apply_partial_rotary_pos_emb
from .configuration_hf_moe import HfMoeConfig
from .top_k import top_k_lower_index_first

INDEXER_NORM_EPS = 1e-6
"""Epsilon of the indexer's key LayerNorm, fixed in DeepSeek's and GLM's code whatever the config says."""
SPARSE_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
"""The attention kernels that take the dense mask the selection is expressed in (as transformers' DeepSeek-V3.2)."""


class HfMoeLightningIndexer(nn.Module):
    """The lightning indexer of one attention layer, with DeepSeek's parameter names (`self_attn.indexer.*`)."""

    def __init__(self, config: HfMoeConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.topk = config.index_topk
        self.rope_interleave = config.indexer_rope_interleave
        self.wq_b = nn.Linear(config.q_lora_rank, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=INDEXER_NORM_EPS)
        self.weights_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.scaling = self.head_dim**-0.5
        self.head_weight_scaling = self.num_heads**-0.5

    @torch.no_grad()
    def project(
        self,
        hidden_states: torch.Tensor,
        query_latent: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated queries `[B, heads, S, index_head_dim]` and keys `[B, 1, S, index_head_dim]` of the tokens of
        `hidden_states` `[B, S, hidden]`, whose normed query latent is `query_latent`. The keys have the layout of
        one attention head, so that they are cached beside MLA's."""
        queries = self.wq_b(query_latent).view(*hidden_states.shape[:-1], self.num_heads, self.head_dim)
        keys = self.k_norm(self.wk(hidden_states)).unsqueeze(1)
        cos, sin = position_embeddings
        return apply_partial_rotary_pos_emb(queries.transpose(1, 2), keys, cos, sin, self.rope_interleave)

    @torch.no_grad()
    def scores(self, hidden_states: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The float32 index scores `[B, S, T]` of the `T` keys `[B, 1, T, D]` for the queries `[B, heads, S, D]` of
        the tokens of `hidden_states`, unmasked. The operations and their operands' layouts are transformers', so
        that equal inputs select equal keys even where scores tie."""
        queries = queries.transpose(1, 2).float().contiguous()  # [B, S, heads, D]
        keys = keys.squeeze(1).float().contiguous()  # [B, T, D]
        per_head = F.relu(torch.matmul(queries, keys.transpose(-1, -2).unsqueeze(1)) * self.scaling)  # [B, S, h, T]
        head_weights = F.linear(hidden_states.float(), self.weights_proj.weight.float()) * self.head_weight_scaling
        return torch.matmul(head_weights.unsqueeze(-2), per_head).squeeze(-2)

    @torch.no_grad()
    def sparse_mask(
        self,
        hidden_states: torch.Tensor,
        queries: torch.Tensor,
        keys: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """`attention_mask` (4D `[B, 1, S, T]`, boolean or additive, or None: causal as SDPA takes it) with every key
        outside each query's `index_topk` best masked too."""
        implementation = self.config._attn_implementation
        if implementation not in SPARSE_ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"DeepSeek sparse attention (index_topk={self.topk}) needs attn_implementation in "
                             f"{SPARSE_ATTENTION_IMPLEMENTATIONS}, whose kernels take the dense mask of the selected "
                             f"keys; got {implementation!r}.")
        num_queries, num_keys = queries.shape[2], keys.shape[2]
        if num_keys <= self.topk:
            return attention_mask  # every key is kept
        if attention_mask is None:  # what SDPA does without a mask: each of several queries sees keys 0..its own
            # index (a forward without cache, a prefill into a static one), a lone query sees every key
            last_seen = torch.arange(num_queries, device=keys.device) + (num_keys - 1 if num_queries == 1 else 0)
            attention_mask = (torch.arange(num_keys, device=keys.device) <= last_seen[:, None])[None, None]
        elif not (torch.is_tensor(attention_mask) and attention_mask.dim() == 4):
            raise ValueError("DeepSeek sparse attention needs a 4D attention mask [B, 1, S, T] or None, got "
                             f"{type(attention_mask).__name__} of shape {getattr(attention_mask, 'shape', None)}.")
        scores = self.scores(hidden_states, queries, keys)
        mask = attention_mask[:, 0]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
        selected = top_k_lower_index_first(scores, self.topk)[1]
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, selected, True).unsqueeze(1)
        if attention_mask.dtype == torch.bool:
            return attention_mask & kept
        return attention_mask.masked_fill(~kept, torch.finfo(hidden_states.dtype).min)
