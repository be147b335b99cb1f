"""Integrations with the transformers Trainer and PEFT."""

from .peft import lora_config
from .trainer import MoETrainerCallback, moe_blocks

__all__ = ["MoETrainerCallback", "lora_config", "moe_blocks"]
