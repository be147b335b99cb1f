"""Configuration of the hf-moe decoder.

One config expresses a dense Llama / Mistral / Qwen2 / Qwen3 decoder exactly (attention biases, q/k norm,
sliding window, RoPE scaling) and turns any subset of its MLP layers into mixture-of-experts layers.
Every field is checked when the config is built, with an error that names the field, the bad value and
what is allowed.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .configuration_checks import (
    is_finite_number,
    validate_layer_types,
    validate_mla,
    validate_norms,
    validate_routing,
    validate_sparse_attention,
)


def _invalid(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"HfMoeConfig.{field}={value!r} is invalid: expected {expected}.")


class HfMoeConfig(PretrainedConfig):
    r"""Configuration for [`HfMoeForCausalLM`].

    Attention fields follow transformers' Llama/Qwen names. MoE fields:

    Args:
        num_experts (`int`): routed experts per MoE layer.
        num_experts_per_tok (`int`): experts each token is sent to (top-k).
        norm_topk_prob (`bool`): renormalise the k selected routing weights to sum to 1.
        moe_intermediate_size (`int`, *optional*): width of one routed expert; defaults to `intermediate_size`.
        gated_experts (`bool`): routed experts are SwiGLU MLPs (`gate_up_proj`, default); `False`: non-gated
            `down(act(up(x)))` experts (`up_proj [E, I, H]`, any `hidden_act`, e.g. `"relu2"` as Nemotron-H).
        moe_layers (`list[int]`, *optional*): explicit indices of MoE layers; overrides the two fields below.
        first_k_dense (`int`): the first k layers keep a dense MLP (DeepSeek style).
        moe_layer_freq (`int`): after `first_k_dense`, every `moe_layer_freq`-th layer is MoE.
        num_shared_experts (`int`): shared experts every token passes through (0 = none).
        shared_expert_intermediate_size (`int`, *optional*): total width of the shared experts; defaults to
            `num_shared_experts * moe_intermediate_size`.
        shared_expert_gate (`bool`): scale the shared expert output by `sigmoid(x·w)` (Qwen2-MoE style).
        router_aux_loss_coef (`float`): weight of the load-balancing loss added to `loss` when labels are given.
        router_z_loss_coef (`float`): weight of the router z-loss added to `loss` when labels are given.
        output_router_logits (`bool`): return each MoE layer's router logits on the model output.
        output_router_metrics (`bool`): return per-layer router metrics (see `hf_moe.router_metrics`) on the output.
        qkv_bias (`bool`): bias on q/k/v only (Qwen2). `attention_bias` puts a bias on q/k/v and o (Llama).
        qk_norm (`bool`): RMSNorm of q and k (Qwen3, OLMoE, GLM-4-MoE's `use_qk_norm`, Hunyuan-MoE).
        qk_norm_scope (`str`): what `qk_norm` normalises: `"head"` (default), each head of `head_dim` values
            (Qwen3, GLM-4-MoE); `"projection"`, the whole q and k projections (`num_attention_heads·head_dim` and
            `num_key_value_heads·head_dim` values) before they are split into heads (OLMoE; not under
            transformers' tensor parallelism, whose plan shards those projections across ranks).
        qk_norm_order (`str`): when the per-head `qk_norm` applies: `"before_rope"` (default; Qwen3, GLM-4-MoE) or
            `"after_rope"`, on the rotated queries and keys (Hunyuan-MoE). The two differ unless both dimensions of
            every rotated pair have the same norm weight.
        sliding_window (`int`, *optional*): attention window of the sliding layers (Mistral); `None` = full causal.
        layer_types (`list[str]`, *optional*): each layer's attention, `"full_attention"` (causal over everything)
            or `"sliding_attention"` (within `sliding_window`), as transformers' Qwen2 / GPT-OSS configs name them;
            `None` (default): every layer slides when `sliding_window` is set, none otherwise.
        attention_sinks (`bool`): a learned logit per head (`sinks [num_attention_heads]`, GPT-OSS) joins each query's
            softmax as one more column, whose value is zero: the attention weights over the keys may sum to less
            than 1 (docs/decisions/attention-sinks.md).
        rope_parameters (`dict`, *optional*): transformers' RoPE parameters (`rope_type`, `rope_theta`, scaling).
            `partial_rotary_factor` in (0, 1] rotates only the first `int(head_dim·factor)` dimensions of each head
            and passes the rest through unchanged (GLM-4-MoE uses 0.5). `llama_4_scaling_beta` β (with
            `original_max_position_embeddings` L; multi-head latent attention only, Mistral-Small-4) multiplies the
            queries at position p by Llama 4's temperature `1 + β·ln(1 + ⌊p / L⌋)`.
        rope_interleave (`bool`): RoPE rotates adjacent pairs `(x0, x1), (x2, x3), …` (ERNIE-4.5's and DeepSeek's
            checkpoints) instead of the two halves of the rotated dimensions.
        kv_lora_rank (`int`, *optional*): set, the attention is multi-head latent attention (DeepSeek-V2/V3,
            `hf_moe.mla`): per token, one cached `kv_lora_rank`-wide latent from which each head's keys and values are
            expanded; then `head_dim` is the rotary width. With it: `qk_nope_head_dim`, `qk_rope_head_dim`,
            `v_head_dim` (required), a head's query/key width without and with RoPE and its value width;
            `q_lora_rank`, queries through a normed latent of that width (`None`: one `q_proj`).
        index_topk (`int`, *optional*): set (with `kv_lora_rank` and `q_lora_rank`), DeepSeek sparse attention
            (`hf_moe.sparse_attention`; DeepSeek-V3.2, GLM-5): a lightning indexer of `index_n_heads` heads of
            `index_head_dim` (required with it) ranks the earlier tokens and each query attends to its `index_topk`
            best only; `indexer_rope_interleave` rotates the indexer's adjacent pairs (GLM-5) instead of halves.
        attention_multiplier (`float`, *optional*): the attention's softmax scale; `None` (default) is
            `head_dim**-0.5` (Granite sets it, e.g. `1/head_dim`). Not with multi-head latent attention.
        embedding_multiplier (`float`): multiplies the input embeddings, those passed as `inputs_embeds` too (Granite).
        residual_multiplier (`float`): multiplies each sublayer's output before the residual add (Granite).
        logits_scaling (`float`): the causal LM's logits are divided by it (Granite).
        norm_placement (`str`): where a layer's RMSNorms sit: `"pre"` (default; Llama), on the attention's and the
            MLP's inputs (`input_layernorm`, `post_attention_layernorm`); `"post"` (OLMo-2, FlexOlmo), on their
            outputs before each residual add (`post_attention_layernorm`, `post_feedforward_layernorm`).

    Routing (docs/routing.md; the defaults are the plain softmax top-k, dropless router with the switch loss):

    Args:
        router_type (`str`): a name in the router registry: `"topk"` (token-choice top-k), `"switch"` (top-1),
            `"expert_choice"`, `"hash"`, `"fake_balanced"`, or one added with `hf_moe.register_router`.
        scoring_func (`str`): `"softmax"` or `"sigmoid"` (DeepSeek-V3) router scores.
        topk_before_softmax (`bool`): pick the k largest logits, then softmax over those k (Mixtral order);
            `False` = softmax over all experts, then top-k (renormalised when `norm_topk_prob`).
        routed_scaling_factor (`float`): multiplies the k combine weights (DeepSeek-V3).
        n_group (`int`, *optional*), topk_group (`int`, *optional*): group-limited routing: experts are split
            into `n_group` groups, the `topk_group` best groups (by `group_score`) are kept and the top-k experts
            are chosen inside them.
        group_score (`str`): with `n_group`, what ranks a group: `"top2_sum"` (default), the sum of its two
            largest selection scores (DeepSeek-V3); `"max"`, its largest one (DeepSeek-V2's group-limited greedy).
        router_jitter_noise (`float`): training only: multiply the router input by `U(1-ε, 1+ε)` (ε this value).
        router_gumbel_noise (`bool`): training only: add Gumbel(0, 1) noise to the logits used for *selection*
            (the combine weights stay the clean scores), as DeepSpeed's RSample policy.
        drop_tokens (`bool`): cap each expert at `capacity` (token, expert) slots and drop the overflow;
            `False` (default) is dropless.
        capacity_factor (`float`), eval_capacity_factor (`float`), min_capacity (`int`): capacity
            `= min(T, max(min_capacity, ceil(T·k·factor / E)))` for T tokens in the batch, the factor depending on
            training/eval mode. Also the per-expert token count of `"expert_choice"`.
        renormalize_after_drop (`bool`): with `drop_tokens`, what a token that lost some of its slots combines.
            `False` (default): its surviving slots keep their weights (with `norm_topk_prob`, `g/(g₁+g₂)` for
            top-2; the dropped share is lost). `True`: its surviving weights are rescaled to the sum its k weights
            had before dropping, so with `norm_topk_prob` a top-2 token's one surviving slot gets 1.0 (times
            `routed_scaling_factor`), as DeepSpeed's `top2gating` / `topkgating` renormalise after the capacity
            mask; without `norm_topk_prob` the token keeps its total routing weight. No effect at k = 1 (a
            dropped token has no slot left).
        use_rts (`bool`): in training, drop at random (random token selection) instead of by routing priority;
            evaluation always drops by priority, so it stays deterministic.
        router_aux_loss_type (`str`): `"switch"` (batch-level `E·Σ fᵢ·Pᵢ`), `"sequence"` (the same per
            sequence, averaged; DeepSeek) or `"none"`.
        use_expert_bias (`bool`): aux-loss-free balancing (DeepSeek-V3): a per-layer `expert_bias` added to the
            scores for selection only, moved by `hf_moe.update_expert_bias`.
        expert_bias_update_rate (`float`): default step of `update_expert_bias`.
        fake_gate_noise (`float`): `"fake_balanced"` only: 0 = perfectly balanced, 1 = random experts/weights.
        hash_seed (`int`): `"hash"` only: seed of the fixed token-id → expert table.

    Product-key routing (`router_type="product_key"`, FlashMoE / PEER; docs/product_key.md): `num_experts` = N²
    experts, a token's logits are two halves of N, expert `i·N + j` scores `log_softmax(half₁)[i] +
    log_softmax(half₂)[j]` and the k best are chosen exactly without scoring all N² pairs.

    Args:
        product_key_heads (`int`): independent product-key heads (PEER), each choosing `num_experts_per_tok`
            experts of the same pool; a token combines `heads·k` experts.
        product_key_query_norm (`str`): the router input's normalisation: `"layer_norm"` (default, per token, no
            affine), `"batch_norm"` (BatchNorm1d without affine, as FlashMoE: batch statistics in training),
            `"running_norm"` (BatchNorm's running statistics in training too: per token) or `"none"`.
    """

    model_type = "hf_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    # transformers' tensor parallelism (`from_pretrained(..., tp_plan="auto")`): attention shards by head (its sinks
    # too), every SwiGLU MLP (dense, shared experts, each routed expert) by its intermediate dimension, and each of
    # them all-reduces its output. The router and `shared_expert_gate` stay replicated: they read the replicated
    # residual stream and every rank needs their whole output. `q_norm`/`k_norm` see only this rank's heads, so their
    # gradients are summed over the ranks; so are those of MLA's shared RoPE key, which skips the sharded `kv_b_proj`.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.q_b_proj": "colwise",
        "layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.self_attn.sinks": "colwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.up_proj": "colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
    }
    # No `base_model_ep_plan`: transformers' expert-parallel styles assume every routing slot names a real expert and
    # set `experts.num_experts` to this rank's count, while hf-moe's capacity and expert-choice routing mark dropped
    # slots with the id `num_experts`. Expert parallelism is `from_pretrained(..., expert_parallel_size=P)`.

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    qk_norm_order: str = "before_rope"
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    attention_sinks: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = False
    index_topk: int | None = None
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    indexer_rope_interleave: bool = False
    attention_multiplier: float | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    norm_placement: str = "pre"
    attention_dropout: float = 0.0
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    moe_intermediate_size: int | None = None
    gated_experts: bool = True
    moe_layers: list[int] | None = None
    first_k_dense: int = 0
    moe_layer_freq: int = 1
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    output_router_logits: bool = False
    output_router_metrics: bool = False
    router_type: str = "topk"
    scoring_func: str = "softmax"
    topk_before_softmax: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    group_score: str = "top2_sum"
    router_jitter_noise: float = 0.0
    router_gumbel_noise: bool = False
    drop_tokens: bool = False
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    renormalize_after_drop: bool = False
    use_rts: bool = False
    router_aux_loss_type: str = "switch"
    use_expert_bias: bool = False
    expert_bias_update_rate: float = 0.001
    fake_gate_noise: float = 0.0
    hash_seed: int = 0
    product_key_heads: int = 1
    product_key_query_norm: str = "layer_norm"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.head_dim is None and self.kv_lora_rank is not None:
            self.head_dim = self.qk_rope_head_dim  # MLA: the rotary width, as transformers' DeepseekV3Config has it
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, dict):
            raise _invalid("rope_parameters", self.rope_parameters, "None or a dict such as {'rope_type': 'default'}")
        if self.layer_types is not None and not isinstance(self.layer_types, (list, tuple)):
            # checked before transformers' post-init, which would read a string as a list of characters
            raise _invalid("layer_types", self.layer_types, "None or a list of attention types, one per layer")
        if isinstance(self.layer_types, tuple):
            self.layer_types = list(self.layer_types)  # as config.json gives it back
        super().__post_init__(**kwargs)
        self._validate()
        # Resolved here (as LlamaConfig does), so code reading `config.head_dim` (cache sizing, transformers' tests,
        # serving engines) gets the number the attention uses, never None.
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def is_mla(self) -> bool:
        """Whether the attention is multi-head latent attention (`kv_lora_rank` is set)."""
        return self.kv_lora_rank is not None

    @property
    def attention_layer_types(self) -> list[str]:
        """Each layer's attention type: `layer_types`, or (when None) `"sliding_attention"` on every layer if
        `sliding_window` is set and `"full_attention"` otherwise."""
        if self.layer_types is not None:
            return list(self.layer_types)
        return ["full_attention" if self.sliding_window is None else "sliding_attention"] * self.num_hidden_layers

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the decoder layers whose MLP is a mixture of experts."""
        if self.moe_layers is not None:
            return sorted(self.moe_layers)
        return [
            i
            for i in range(self.first_k_dense, self.num_hidden_layers)
            if (i - self.first_k_dense) % self.moe_layer_freq == 0
        ]

    @property
    def shared_expert_size(self) -> int:
        """Total intermediate width of the shared experts (0 when there are none)."""
        if self.shared_expert_intermediate_size is not None:
            return self.shared_expert_intermediate_size
        return self.num_shared_experts * self.moe_intermediate_size

    def _validate(self) -> None:
        def fail(field: str, value: Any, expected: str) -> None:
            raise _invalid(field, value, expected)

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                      "num_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_layer_freq"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(field, value, "a positive integer")
        for field in ("first_k_dense", "num_shared_experts"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                fail(field, value, "an integer >= 0")
        for field in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "head_dim",
                      "shared_expert_intermediate_size", "sliding_window"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                fail(field, value, "a positive integer or None")
        for field in ("rms_norm_eps", "initializer_range", "embedding_multiplier", "residual_multiplier",
                      "logits_scaling"):
            if not is_finite_number(getattr(self, field)) or getattr(self, field) <= 0:
                fail(field, getattr(self, field), "a positive finite number")
        for field in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not is_finite_number(getattr(self, field)) or getattr(self, field) < 0:
                fail(field, getattr(self, field), "a finite number >= 0")
        if not is_finite_number(self.attention_dropout) or not 0.0 <= self.attention_dropout < 1.0:
            fail("attention_dropout", self.attention_dropout, "a probability in [0, 1) (a number, not a string)")
        for field in ("use_cache", "tie_word_embeddings", "attention_bias", "qkv_bias", "qk_norm",
                      "shared_expert_gate", "output_router_logits", "rope_interleave", "gated_experts",
                      "attention_sinks"):
            if not isinstance(getattr(self, field), bool):
                fail(field, getattr(self, field), "True or False")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            fail("hidden_act", self.hidden_act, f"one of transformers' activations ({', '.join(sorted(ACT2FN))})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            fail("num_attention_heads", self.num_attention_heads,
                 f"a divisor of hidden_size={self.hidden_size} (or set head_dim explicitly)")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            fail("num_key_value_heads", self.num_key_value_heads,
                 f"a divisor of num_attention_heads={self.num_attention_heads}")
        if self.num_experts_per_tok > self.num_experts:
            fail("num_experts_per_tok", self.num_experts_per_tok, f"at most num_experts={self.num_experts}")
        if self.first_k_dense > self.num_hidden_layers:
            fail("first_k_dense", self.first_k_dense, f"at most num_hidden_layers={self.num_hidden_layers}")
        if self.moe_layers is not None:
            if not isinstance(self.moe_layers, (list, tuple)):
                fail("moe_layers", self.moe_layers,
                     f"None or a list of distinct layer indices in [0, {self.num_hidden_layers})")
            bad = [i for i in self.moe_layers
                   if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
            if bad or len(set(self.moe_layers)) != len(self.moe_layers):
                fail("moe_layers", self.moe_layers,
                     f"distinct layer indices in [0, {self.num_hidden_layers}) (bad: {bad or 'duplicates'})")
        scale = self.attention_multiplier
        if scale is not None and (not is_finite_number(scale) or scale <= 0):
            fail("attention_multiplier", scale, "a positive finite number or None")
        validate_norms(self, fail)
        validate_layer_types(self, fail)
        validate_mla(self, fail)
        validate_sparse_attention(self, fail)
        self._validate_partial_rotary(fail)
        if self.shared_expert_gate and self.shared_expert_size == 0:
            fail("shared_expert_gate", True, "False when there is no shared expert (num_shared_experts=0)")
        validate_routing(self, fail)
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            fail("rope_parameters['rope_type']", rope_type,
                 f"'default' or one of {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")

    @property
    def rotary_dim(self) -> int:
        """How many leading dimensions of each head RoPE rotates: `int(head_dim · partial_rotary_factor)`, where the
        factor is `rope_parameters["partial_rotary_factor"]` (1.0 when absent)."""
        factor = (self.rope_parameters or {}).get("partial_rotary_factor", 1.0)
        return int((self.head_dim or self.hidden_size // self.num_attention_heads) * factor)

    def _validate_partial_rotary(self, fail) -> None:
        factor = (self.rope_parameters or {}).get("partial_rotary_factor", 1.0)
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if not is_finite_number(factor) or not 0 < factor <= 1:
            fail("rope_parameters['partial_rotary_factor']", factor, "a number in (0, 1]")
        rotary_dim = self.rotary_dim
        if rotary_dim < 2 or rotary_dim % 2:
            fail("rope_parameters['partial_rotary_factor']", factor,
                 f"a factor that rotates an even number >= 2 of the head_dim={head_dim} dimensions (got {rotary_dim})")


__all__ = ["HfMoeConfig"]
