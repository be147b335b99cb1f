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

ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")


class HfMoeConfig(PretrainedConfig):
    r"""Configuration for [`HfMoeForCausalLM`].

    Attention fields follow transformers' Llama/Qwen names. MoE fields:

    Args:
        num_experts (`int`): routed experts per MoE layer.
        num_experts_per_tok (`int`): experts each token is sent to (top-k).
        norm_topk_prob (`bool`): renormalise the k selected routing weights to sum to 1.
        moe_intermediate_size (`int`, *optional*): width of one routed expert; defaults to `intermediate_size`.
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
        qkv_bias (`bool`): bias on q/k/v only (Qwen2). `attention_bias` puts a bias on q/k/v and o (Llama).
        qk_norm (`bool`): RMSNorm over each head of q and k before RoPE (Qwen3).
        sliding_window (`int`, *optional*): attention window for every layer (Mistral); `None` = full causal.
    """

    model_type = "hf_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

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
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    num_experts: int = 8
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    moe_intermediate_size: int | None = None
    moe_layers: list[int] | None = None
    first_k_dense: int = 0
    moe_layer_freq: int = 1
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    output_router_logits: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        super().__post_init__(**kwargs)
        self._validate()

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
            raise ValueError(f"HfMoeConfig.{field}={value!r} is invalid: expected {expected}.")

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
        for field in ("head_dim", "shared_expert_intermediate_size", "sliding_window"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                fail(field, value, "a positive integer or None")
        for field in ("rms_norm_eps", "initializer_range"):
            if not isinstance(getattr(self, field), (int, float)) or getattr(self, field) <= 0:
                fail(field, getattr(self, field), "a positive number")
        for field in ("router_aux_loss_coef", "router_z_loss_coef"):
            if not isinstance(getattr(self, field), (int, float)) or getattr(self, field) < 0:
                fail(field, getattr(self, field), "a number >= 0")
        if not 0.0 <= self.attention_dropout < 1.0:
            fail("attention_dropout", self.attention_dropout, "a probability in [0, 1)")
        if self.hidden_act not in ACT2FN:
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
            bad = [i for i in self.moe_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
            if bad or len(set(self.moe_layers)) != len(self.moe_layers):
                fail("moe_layers", self.moe_layers,
                     f"distinct layer indices in [0, {self.num_hidden_layers}) (bad: {bad or 'duplicates'})")
        if self.shared_expert_gate and self.shared_expert_size == 0:
            fail("shared_expert_gate", True, "False when there is no shared expert (num_shared_experts=0)")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            fail("rope_parameters['rope_type']", rope_type,
                 f"'default' or one of {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")


__all__ = ["HfMoeConfig"]
