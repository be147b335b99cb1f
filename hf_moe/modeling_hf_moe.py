"""The hf-moe decoder: a Llama/Mistral/Qwen2/Qwen3-compatible transformer whose MLPs may be mixtures of experts.

Attention, RoPE, RMSNorm and each layer type's mask (`hf_moe.attention`) and the KV cache come from transformers; the
MoE block is `hf_moe.moe.block.HfMoeSparseMoeBlock`, whose experts use transformers' experts-implementation interface.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import CompileConfig, GenerationMixin
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import (
    HfMoeAttention,
    HfMoeRMSNorm,
    HfMoeRotaryEmbedding,
    causal_masks,
    inference_sdpa_backends,
    masks_for_generate,
)
from .configuration_hf_moe import HfMoeConfig
from .decode_graphs import CUDAGraphConfig, decode_graphs, default_graph_decoding
from .loss import FusedCausalLMLoss
from .mla import HfMoeMultiHeadLatentAttention
from .modeling_outputs import HfMoeCausalLMOutputWithPast, HfMoeModelOutputWithPast
from .moe.block import HfMoeSparseMoeBlock, moe_blocks, token_mask
from .moe.experts import HfMoeExperts
from .moe.metrics import compute_router_metrics
from .moe.mlp import HfMoeMLP
from .moe.router.losses import check_router_loss_gradient, router_loss_weight
from .moe.router.topk import HfMoeRouter
from .moe.types import RouterOutput


class HfMoeDecoderLayer(GradientCheckpointingLayer):
    """Decoder layer: attention (of `attention_type`, which picks the layer's mask), then a dense MLP or an MoE
    block, each a residual branch `x + m·f(norm(x))` (`norm_placement="pre"`) or `x + m·norm(f(x))` (`"post"`), `m`
    the `residual_multiplier`."""

    def __init__(self, config: HfMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_type = config.attention_layer_types[layer_idx]
        attention = HfMoeMultiHeadLatentAttention if config.is_mla else HfMoeAttention
        self.self_attn = attention(config, layer_idx)
        if layer_idx in config.moe_layer_indices:
            self.mlp = HfMoeSparseMoeBlock(config, layer_idx)
        else:
            self.mlp = HfMoeMLP(config, config.intermediate_size)
        self.norm_after = config.norm_placement == "post"
        self.post_attention_layernorm = HfMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.norm_after:  # post_attention_layernorm on the attention's output, this one on the MLP's
            self.post_feedforward_layernorm = HfMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:  # this one on the attention's input, post_attention_layernorm on the MLP's
            self.input_layernorm = HfMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.residual_multiplier = config.residual_multiplier

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        """The layer's output and its MoE block's routing (`None` for a dense layer)."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states if self.norm_after else self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, **kwargs,
        )
        if self.norm_after:
            hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual = self.add_residual(residual, hidden_states)
        if not self.norm_after:
            hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, routing = self.mlp(hidden_states, token_mask, input_ids, output_routing=True)
        if self.norm_after:
            hidden_states = self.post_feedforward_layernorm(hidden_states)
        return self.add_residual(residual, hidden_states), routing

    def add_residual(self, residual: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """`residual + residual_multiplier · update`; a multiplier of 1 costs no multiplication."""
        return residual + (update if self.residual_multiplier == 1.0 else update * self.residual_multiplier)


class HfMoePreTrainedModel(PreTrainedModel):
    config_class = HfMoeConfig
    config: HfMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfMoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # static-cache generate compiles with fullgraph=True (tests/test_compile.py)
    _can_record_outputs = {  # the routing is collected by the model's forward, which needs no hooks
        "hidden_states": HfMoeDecoderLayer,
        "attentions": [OutputRecorder(HfMoeAttention, index=1),
                       OutputRecorder(HfMoeMultiHeadLatentAttention, index=1)],
    }

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """transformers' method, non-reentrant unless asked otherwise (reentrant drops the router losses' gradient)."""
        options = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        super().gradient_checkpointing_enable(options, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, expert_parallel_size: int | None = None,
                        **kwargs):
        """transformers' `from_pretrained`, plus `expert_parallel_size=P`: under a distributed launch, each rank
        reads only its E/P experts from the checkpoint and tokens reach them through all-to-all (see
        `hf_moe.parallel`); `global_aux_loss` and `padded_dispatch` go to `hf_moe.parallel.expert_parallelize`.

        A local checkpoint folder of another MoE family (`hf_moe.interop.FAMILIES`: Mixtral, Qwen-MoE, DeepSeek, GLM,
        ...) loads directly: its config is mapped field by field and its tensors renamed and fused on the fly, so the
        model computes what the family's transformers class computes, or `InteropError` names what hf-moe cannot
        express. A folder of any other model type is refused (`InteropError`)."""
        from .interop import FAMILIES, InteropError, checkpoint_model_type

        config = kwargs.get("config")
        if expert_parallel_size is None and config is not None:
            expert_parallel_size = getattr(config, "expert_parallel_size", None)  # through AutoModel's config
        foreign = None
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            foreign = checkpoint_model_type(os.path.join(pretrained_model_name_or_path, kwargs.get("subfolder") or ""))
        if foreign not in (None, "hf_moe", *FAMILIES) and config is None:
            raise InteropError(
                f"{pretrained_model_name_or_path} holds a model_type={foreign!r} checkpoint, which hf-moe does not "
                f"import: it loads its own checkpoints (model_type 'hf_moe') and the MoE families "
                f"{', '.join(FAMILIES)}. A dense model becomes an MoE with `hf-moe upcycle`; any other model loads "
                "with transformers' own class (AutoModelForCausalLM).")
        if expert_parallel_size is None and foreign in FAMILIES and not model_args:
            from .interop.load import load_foreign_pretrained

            return load_foreign_pretrained(cls, pretrained_model_name_or_path, kwargs)
        if expert_parallel_size is None:
            wants_info = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                                  output_loading_info=True, **kwargs)
            _refuse_partial_moe_load(model, info, pretrained_model_name_or_path)
            return (model, info) if wants_info else model
        from .parallel import from_pretrained_expert_parallel

        return from_pretrained_expert_parallel(cls, pretrained_model_name_or_path, expert_parallel_size, model_args,
                                               kwargs)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for the decorator's text in the model's own module; ours lives in moe/experts.py.
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None, *args, **kwargs) -> str:
        # hf-moe's own implementations are the default (fastest: docs/decisions/experts-kernels.md); any other by name
        if requested_experts is None:  # product keys: many tiny experts, computed token by token
            return "hf_moe_gathered" if self.config.router_type == "product_key" else "hf_moe_grouped"
        return super().get_correct_experts_implementation(requested_experts, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, HfMoeExperts):
            init.normal_(module.input_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, HfMoeRouter):
            module.initialize(std)
        elif isinstance(module, HfMoeAttention) and module.sinks is not None:
            init.normal_(module.sinks, mean=0.0, std=std)

    @property
    def supports_context_parallel(self) -> bool:
        """transformers' rule, and no attention sinks: context parallelism runs SDPA, which has none."""
        return super().supports_context_parallel and not self.config.attention_sinks


def _refuse_partial_moe_load(model: nn.Module, info: dict, path) -> None:
    """A checkpoint whose MoE tensors (router, experts, shared experts) are missing or named otherwise would leave
    them freshly initialised, and the model silently wrong: refuse it, naming the tensors."""
    blocks = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, HfMoeSparseMoeBlock))
    missing = sorted(k for k in info["missing_keys"] if k.startswith(blocks))
    unexpected = sorted(k for k in info["unexpected_keys"] if k.startswith(blocks))
    if missing or unexpected:
        raise ValueError(
            f"{path}: the checkpoint does not match this model's MoE layers: missing {missing[:4]}"
            f"{' …' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}{' …' if len(unexpected) > 4 else ''}. "
            "Loading it would leave those weights randomly initialised. Is it a checkpoint of another architecture "
            "(convert it first) or of another config (num_experts, moe_layers)?")


class HfMoeModel(HfMoePreTrainedModel):
    """The bare decoder: embeddings → layers → final norm."""

    def __init__(self, config: HfMoeConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HfMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HfMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = HfMoeRotaryEmbedding(config=config)
        self.embedding_multiplier = config.embedding_multiplier
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_outputs: bool = False,
        **kwargs,
    ) -> HfMoeModelOutputWithPast:
        """Hidden states (`output_hidden_states`) and attention weights (`output_attentions`) are recorded by
        transformers' output hooks (`_can_record_outputs`); each MoE layer's router logits (`output_router_logits`)
        and [`RouterOutput`] (`output_router_outputs`) are collected from the blocks."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        causal_only = attention_mask is None and past_key_values is None and position_ids is None
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen

        masks = causal_masks(self.config, inputs_embeds, attention_mask, past_key_values, position_ids, causal_only)
        tokens = token_mask(attention_mask, inputs_embeds.shape[1])
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        routings = [] if output_router_logits or output_router_outputs else None

        multiplier = self.embedding_multiplier
        hidden_states = inputs_embeds if multiplier == 1.0 else inputs_embeds * multiplier
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        with inference_sdpa_backends(self.config._attn_implementation, hidden_states):
            for layer in self.layers:
                hidden_states, routing = layer(
                    hidden_states,
                    attention_mask=masks[layer.attention_type],
                    position_ids=position_ids,
                    past_key_values=past_key_values,
                    position_embeddings=position_embeddings,
                    token_mask=tokens,
                    input_ids=input_ids,
                    **kwargs,
                )
                if routings is not None and routing is not None:
                    routings.append(routing)
        return HfMoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states),
            past_key_values=past_key_values if use_cache else None,
            router_logits=tuple(r.logits for r in routings) if output_router_logits else None,
            router_outputs=tuple(routings) if output_router_outputs else None,
        )


class HfMoeForCausalLM(FusedCausalLMLoss, HfMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: HfMoeConfig) -> None:
        super().__init__(config)
        self.model = HfMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logits_scaling = config.logits_scaling
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_metrics: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HfMoeCausalLMOutputWithPast | tuple:
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        output_router_metrics = (
            output_router_metrics if output_router_metrics is not None else self.config.output_router_metrics
        )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            # the router losses and metrics come from them; inference that reads neither (generate) collects none
            output_router_outputs=labels is not None or output_router_logits or output_router_metrics,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling

        # The router losses are reported with a loss or with router logits (as Mixtral's and Qwen3-MoE's are), so the
        # first element of an output tuple is the loss when labels are given and the logits otherwise.
        aux_loss = z_loss = None
        if outputs.router_outputs and (labels is not None or output_router_logits):
            aux_loss = torch.stack([r.aux_loss for r in outputs.router_outputs]).mean()
            z_loss = torch.stack([r.z_loss for r in outputs.router_outputs]).mean()

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)  # fused on CUDA (FusedCausalLMLoss)
            if aux_loss is not None:
                scale = router_loss_weight(labels, kwargs.get("shift_labels"), kwargs.get("num_items_in_batch"))
                router_loss = self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
                if self.training and (self.config.router_aux_loss_coef or self.config.router_z_loss_coef):
                    check_router_loss_gradient(router_loss, loss, lambda: moe_blocks(self))
                loss = loss + router_loss.to(loss.device) * (scale.to(loss.device) if torch.is_tensor(scale) else scale)

        output = HfMoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            router_outputs=outputs.router_outputs if output_router_logits else None,
            router_metrics=(
                tuple(compute_router_metrics(r) for r in outputs.router_outputs) if output_router_metrics else None
            ),
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    # generate's masks for a static cache are forward's (transformers' own function cannot read layer_types=None)
    create_masks_for_generate = staticmethod(masks_for_generate)

    def get_compiled_call(self, compile_config: CompileConfig | None) -> Callable:
        """transformers' compiled forward for static-cache decoding, or with `compile_config=CUDAGraphConfig()` the
        eager forward replayed from CUDA graphs (`hf_moe.decode_graphs`)."""
        if isinstance(compile_config, CUDAGraphConfig):
            return decode_graphs(self).for_generate(compile_config)
        return super().get_compiled_call(compile_config)

    def generate(self, *args, **kwargs):
        """transformers' `generate`; from CUDA graphs where `default_graph_decoding` allows. Refused for acausal
        routers (expert choice: routing across the batch and sequence, which cached decoding cannot reproduce)."""
        acausal = sorted({type(m).__name__ for m in self.modules() if isinstance(m, HfMoeRouter) and not m.is_causal})
        if acausal:
            raise ValueError(f"generate() is not supported with router_type={self.config.router_type!r} "
                             f"({', '.join(acausal)}): each expert picks its tokens across the whole batch, so "
                             "routing is not causal and cached decoding would compute a different function than "
                             "training. Use a token-choice router_type (e.g. 'topk') for models meant to generate.")
        if default_graph_decoding(self, args, kwargs) is None:
            kwargs.update(cache_implementation="static", compile_config=CUDAGraphConfig())
        return super().generate(*args, **kwargs)


class HfMoeForSequenceClassification(GenericForSequenceClassification, HfMoePreTrainedModel):
    pass


__all__ = [
    "HfMoeForCausalLM",
    "HfMoeForSequenceClassification",
    "HfMoeModel",
    "HfMoePreTrainedModel",
]
