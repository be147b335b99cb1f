"""Integrations with the transformers Trainer and PEFT."""

from ..moe.block import moe_blocks
from ..parallel import save_adapter_expert_parallel
from .peft import lora_config
from .trainer import MoETrainerCallback

__all__ = ["MoETrainerCallback", "lora_config", "moe_blocks", "save_adapter_expert_parallel"]
