"""Converters: dense → MoE upcycling of Llama, Mistral, Qwen2 and Qwen3 checkpoints into hf-moe checkpoints.

    from conversions import UpcycleConfig, upcycle
    upcycle("./llama-dense", "./llama-8x", UpcycleConfig(num_experts=8, top_k=2, verify=True))

The same from the shell: `hf-moe upcycle SRC OUT --num-experts 8 --top-k 2 --verify` (or `python -m conversions`).
"""

from .safetensors_io import CheckpointError
from .sources import SUPPORTED_SOURCES, UnsupportedSourceError
from .upcycling import UpcycleConfig, UpcycleError, UpcycleResult, upcycle
from .verification import VerifyResult, verify_upcycle

__all__ = [
    "SUPPORTED_SOURCES",
    "CheckpointError",
    "UnsupportedSourceError",
    "UpcycleConfig",
    "UpcycleError",
    "UpcycleResult",
    "VerifyResult",
    "upcycle",
    "verify_upcycle",
]
