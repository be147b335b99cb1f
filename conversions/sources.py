"""Dense source checkpoints: which architectures we read, and how each maps exactly onto `HfMoeConfig`.

A source is a transformers checkpoint folder (config.json + safetensors). Its config is parsed by
transformers' own config class, so defaults and derived fields (Qwen2's per-layer sliding window, Llama's
head_dim) are the ones its modeling code uses. Anything hf-moe cannot reproduce exactly is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from hf_moe import HfMoeConfig, HfMoeForCausalLM
from hf_moe.checkpoint_files import CheckpointError

from .safetensors_io import SafetensorsReader
from .upcycle_types import SUPPORTED_TEXT

SUPPORTED_SOURCES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

# Fields copied unchanged from the source config.
_COMMON_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "tie_word_embeddings", "rope_parameters", "attention_dropout",
    "pad_token_id", "bos_token_id", "eos_token_id",
)
# Tensors some older checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class UnsupportedSourceError(ValueError):
    """The source checkpoint's architecture or one of its settings cannot be expressed by hf-moe."""


def _attention_fields(model_type: str, cfg: PretrainedConfig) -> dict[str, Any]:
    """The attention variant of each family, in hf-moe's terms; refuses what hf-moe would compute differently."""
    if model_type == "llama":
        if getattr(cfg, "mlp_bias", False):
            raise UnsupportedSourceError(
                "llama checkpoint has mlp_bias=True (biases on gate/up/down_proj); hf-moe experts have no biases, so "
                "the upcycled model could not equal the dense one. Supported: mlp_bias=False.")
        return {"attention_bias": bool(cfg.attention_bias)}
    if model_type == "mistral":
        return {"sliding_window": cfg.sliding_window}
    layer_types = list(cfg.layer_types)
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other or 0 < len(sliding) < len(layer_types):
        raise UnsupportedSourceError(
            f"{model_type} checkpoint mixes attention types across layers (layer_types={layer_types}; from "
            f"use_sliding_window={getattr(cfg, 'use_sliding_window', None)}, max_window_layers="
            f"{getattr(cfg, 'max_window_layers', None)}). hf-moe applies one sliding_window to every layer, so "
            f"only all-full (use_sliding_window=False) or all-sliding (max_window_layers=0) sources are supported.")
    fields: dict[str, Any] = {"sliding_window": cfg.sliding_window if sliding else None}
    if model_type == "qwen2":
        fields["qkv_bias"] = True
    else:
        fields.update(qk_norm=True, attention_bias=bool(cfg.attention_bias))
    return fields


@dataclass
class DenseSource:
    """A dense checkpoint folder: its transformers config, the equivalent hf-moe fields and its tensors."""

    path: Path
    model_type: str
    config: PretrainedConfig
    hf_moe_fields: dict[str, Any]
    reader: SafetensorsReader

    @classmethod
    def open(cls, path: str | Path) -> DenseSource:
        path = Path(path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path} has no config.json; expected a transformers checkpoint folder "
                                  f"({SUPPORTED_TEXT}).")
        try:
            model_type = json.loads(config_path.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{config_path} is not valid JSON ({err}).") from err
        if model_type not in SUPPORTED_SOURCES:
            raise UnsupportedSourceError(f"model_type={model_type!r} in {config_path} is not supported for upcycling; "
                                         f"supported dense sources: {SUPPORTED_TEXT}.")
        cfg = SUPPORTED_SOURCES[model_type].from_pretrained(path)
        fields = {name: getattr(cfg, name) for name in _COMMON_FIELDS if hasattr(cfg, name)}
        fields.update(_attention_fields(model_type, cfg))
        source = cls(path, model_type, cfg, fields, SafetensorsReader(path))
        source._check_tensors()
        return source

    def dense_config(self) -> HfMoeConfig:
        """The source model as an hf-moe config with no MoE layer (computes exactly what the source computes)."""
        return HfMoeConfig(**self.hf_moe_fields, moe_layers=[])

    @property
    def dtype(self) -> torch.dtype:
        return self.reader.tensors["model.embed_tokens.weight"].dtype

    def _check_tensors(self) -> None:
        expected = expected_shapes(self.dense_config())
        have = self.reader.tensors
        missing = [k for k in expected if k not in have]
        if missing:
            raise CheckpointError(
                f"{self.path} is missing {len(missing)} tensor(s) a {self.model_type} model with this "
                f"config needs (first: {missing[:5]}); the checkpoint is incomplete."
            )
        wrong = [f"{k}: {have[k].shape} (expected {shape})" for k, shape in expected.items() if have[k].shape != shape]
        if wrong:
            raise CheckpointError(f"{self.path} has tensors whose shapes disagree with config.json: {wrong[:5]}.")
        allowed_extra = {"lm_head.weight"} if self.hf_moe_fields["tie_word_embeddings"] else set()
        extra = [k for k in have if k not in expected and k not in allowed_extra and not k.endswith(_IGNORED_SUFFIXES)]
        if extra:
            raise UnsupportedSourceError(
                f"{self.path} has {len(extra)} tensor(s) that a {self.model_type} model in hf-moe has no place for "
                f"(first: {extra[:5]}); refusing rather than dropping weights.")
        float_types = (torch.float32, torch.bfloat16, torch.float16)
        odd = sorted({str(have[k].dtype) for k in expected if have[k].dtype not in float_types})
        if odd:
            raise UnsupportedSourceError(f"{self.path} holds tensors of dtype {odd}; upcycling reads float32, bfloat16 "
                                         f"or float16 checkpoints (quantized checkpoints are not supported).")


def expected_shapes(config: HfMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape an `HfMoeForCausalLM` with this config saves (the tied head excluded)."""
    with torch.device("meta"):
        model = HfMoeForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes
