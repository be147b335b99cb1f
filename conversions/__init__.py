"""Converters: dense → MoE upcycling of Llama, Mistral, Qwen2 and Qwen3 checkpoints into hf-moe checkpoints.

    from conversions import UpcycleConfig, upcycle
    upcycle("./llama-dense", "./llama-8x", UpcycleConfig(num_experts=8, top_k=2, verify=True))

The same from the shell: `hf-moe upcycle SRC OUT --num-experts 8 --top-k 2 --verify` (or `python -m conversions`).

The names below are imported on first use, so `hf-moe --help` answers without loading torch and transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_moe.checkpoint_files import CheckpointError

    from .flash_moe import flash_moe_block_state_dict, flash_moe_config_fields
    from .sources import SUPPORTED_SOURCES, UnsupportedSourceError
    from .upcycle_types import UpcycleConfig, UpcycleError, UpcycleResult, VerifyResult
    from .upcycling import upcycle
    from .verification import verify_upcycle

# Public name → the module that defines it.
_EXPORTS = {
    "SUPPORTED_SOURCES": ".sources",
    "CheckpointError": "hf_moe.checkpoint_files",
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
    "UnsupportedSourceError",
    "UpcycleConfig",
    "UpcycleError",
    "UpcycleResult",
    "VerifyResult",
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
