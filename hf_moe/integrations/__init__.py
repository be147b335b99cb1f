"""Integrations with the transformers Trainer and PEFT."""

from .peft import lora_config, save_adapter_expert_parallel
from .trainer import MoETrainerCallback, moe_blocks

__all__ = ["MoETrainerCallback", "lora_config", "moe_blocks", "save_adapter_expert_parallel"]
