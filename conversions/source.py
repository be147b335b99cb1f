"""Reading dense source checkpoints: which architectures, which files, which tensors.

Only safetensors are read (never a pickle), one tensor at a time through `safe_open`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# Files copied unchanged next to the converted weights.
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


class SourceError(ValueError):
    """The source checkpoint cannot be converted; the message says why and what is supported."""


@dataclass
class Source:
    """A dense checkpoint on disk: its transformers config and where each tensor lives."""

    path: str
    config: PretrainedConfig
    tensor_files: dict[str, str]

    def __contains__(self, name: str) -> bool:
        return name in self.tensor_files

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (and nothing else) from its safetensors file."""
        if name not in self.tensor_files:
            raise SourceError(f"{self.path}: tensor {name!r} is missing from the checkpoint.")
        try:
            with safe_open(self.tensor_files[name], framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise SourceError(f"{self.tensor_files[name]}: cannot read tensor {name!r} ({e}).") from e

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."


def open_source(path: str) -> Source:
    """Check that `path` is a supported dense checkpoint and index its tensors (reads headers only)."""
    if not os.path.isdir(path):
        raise SourceError(f"Source {path!r} is not a folder; expected a model folder with config.json and "
                          "*.safetensors files.")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise SourceError(f"{path}: no config.json.")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise SourceError(f"{path}: model_type={model_type!r} is not supported; hf-moe upcycles "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints.")
    config = AutoConfig.from_pretrained(path)
    files = sorted(os.listdir(path))
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        missing = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(path, v))})
        if missing:
            raise SourceError(f"{path}: shards listed in model.safetensors.index.json are missing: {missing}.")
        tensor_files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        single = os.path.join(path, "model.safetensors")
        tensor_files = {name: single for name in _tensor_names(single)}
    elif any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files):
        raise SourceError(f"{path}: only pickle weights (.bin/.pt) found. hf-moe never unpickles; convert them to "
                          "safetensors first (load with transformers, then save_pretrained).")
    else:
        raise SourceError(f"{path}: no model.safetensors or model.safetensors.index.json.")
    for file in sorted(set(tensor_files.values())):
        _tensor_names(file)  # fails early, with the file's name, on a truncated or corrupt shard
    return Source(path=path, config=config, tensor_files=tensor_files)


def _tensor_names(file: str) -> list[str]:
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise SourceError(f"{file}: not a readable safetensors file ({e}).") from e


def sliding_window_of(config: PretrainedConfig) -> int | None:
    """The one attention window of every layer, `None` for full attention; refuses mixed layer types."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral" or not layer_types:
        return window
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    raise SourceError(f"layer_types={layer_types} mixes full and sliding-window attention; hf-moe expresses one "
                      "attention window for every layer.")


def dense_config_kwargs(config: PretrainedConfig) -> dict:
    """HfMoeConfig fields that express the dense source architecture exactly."""
    if getattr(config, "mlp_bias", False):
        raise SourceError("mlp_bias=True is not supported: hf-moe experts have no biases.")
    if config.hidden_act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
        raise SourceError(f"hidden_act={config.hidden_act!r} is not supported for upcycling.")
    model_type = config.model_type
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=dict(config.rope_parameters),
        attention_bias=bool(getattr(config, "attention_bias", False)) and model_type != "qwen2",
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        sliding_window=sliding_window_of(config),
        attention_dropout=float(getattr(config, "attention_dropout", 0.0)),
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
