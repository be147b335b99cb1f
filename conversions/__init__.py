"""Converters: dense → MoE upcycling of Llama, Mistral, Qwen2 and Qwen3 checkpoints (`upcycle`), with a CLI
(`hf-moe upcycle` or `python -m conversions upcycle`)."""

from .source import SUPPORTED_ARCHITECTURES, SourceError
from .upcycle import UpcycleConfig, UpcycleReport, upcycle, verify

__all__ = ["SUPPORTED_ARCHITECTURES", "SourceError", "UpcycleConfig", "UpcycleReport", "upcycle", "verify"]
