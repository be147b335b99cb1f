"""Converters: dense → MoE upcycling of Llama, Mistral, Qwen2 and Qwen3 checkpoints into hf-moe checkpoints, and
exact conversion of MoE checkpoints between hf-moe and Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and GLM-4-MoE.

    from conversions import UpcycleConfig, convert, upcycle
    upcycle("./llama-dense", "./llama-8x", UpcycleConfig(num_experts=8, top_k=2, verify=True))
    convert("./llama-8x", "./llama-8x-mixtral", to="mixtral")

The same from the shell: `hf-moe upcycle SRC OUT --num-experts 8 --top-k 2 --verify` and
`hf-moe convert SRC OUT --to mixtral` (or `python -m conversions`).

The names below are imported on first use, so `hf-moe --help` answers without loading torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_moe.checkpoint_files import CheckpointError

    from .convert_types import ConvertError, ConvertResult
    from .converting import TARGETS, convert
    from .flash_moe import flash_moe_block_state_dict, flash_moe_config_fields
    from .sources import SUPPORTED_SOURCES, UnsupportedSourceError
    from .upcycle_types import UpcycleConfig, UpcycleError, UpcycleResult, VerifyResult
    from .upcycling import upcycle
    from .verification import verify_upcycle

# Public name → the module that defines it.
_EXPORTS = {
    "SUPPORTED_SOURCES": ".sources",
    "CheckpointError": "hf_moe.checkpoint_files",
    "ConvertError": ".convert_types",
    "ConvertResult": ".convert_types",
    "TARGETS": ".converting",
    "convert": ".converting",
    "UnsupportedSourceError": ".sources",
    "UpcycleConfig": ".upcycle_types",
    "UpcycleError": ".upcycle_types",
    "UpcycleResult": ".upcycle_types",
    "VerifyResult": ".upcycle_types",
    "flash_moe_block_state_dict": ".flash_moe",
    "flash_moe_config_fields": ".flash_moe",
    "upcycle": ".upcycling",
    "verify_upcycle": ".verification",
}

__all__ = [
    "SUPPORTED_SOURCES",
    "CheckpointError",
    "ConvertError",
    "ConvertResult",
    "TARGETS",
    "UnsupportedSourceError",
    "UpcycleConfig",
    "UpcycleError",
    "UpcycleResult",
    "VerifyResult",
    "convert",
    "flash_moe_block_state_dict",
    "flash_moe_config_fields",
    "upcycle",
    "verify_upcycle",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
