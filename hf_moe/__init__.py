"""hf-moe: Mixture-of-Experts models as first-class citizens of 🤗 transformers.

`import hf_moe` registers `HfMoeConfig` (`model_type="hf_moe"`) and its models with transformers' Auto
classes, so `AutoModelForCausalLM.from_pretrained` loads hf-moe checkpoints.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration_hf_moe import HfMoeConfig
from .modeling_hf_moe import (
    HfMoeCausalLMOutputWithPast,
    HfMoeForCausalLM,
    HfMoeForSequenceClassification,
    HfMoeModel,
    HfMoePreTrainedModel,
)
from .moe.experts import HfMoeExperts, grouped_experts_forward
from .moe.layer import HfMoeSparseMoeBlock
from .moe.router import HfMoeRouter, RouterOutput, load_balancing_loss, router_z_loss

__version__ = "0.1.0"

AutoConfig.register(HfMoeConfig.model_type, HfMoeConfig, exist_ok=True)
AutoModel.register(HfMoeConfig, HfMoeModel, exist_ok=True)
AutoModelForCausalLM.register(HfMoeConfig, HfMoeForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HfMoeConfig, HfMoeForSequenceClassification, exist_ok=True)

__all__ = [
    "HfMoeCausalLMOutputWithPast",
    "HfMoeConfig",
    "HfMoeExperts",
    "HfMoeForCausalLM",
    "HfMoeForSequenceClassification",
    "HfMoeModel",
    "HfMoePreTrainedModel",
    "HfMoeRouter",
    "HfMoeSparseMoeBlock",
    "RouterOutput",
    "grouped_experts_forward",
    "load_balancing_loss",
    "router_z_loss",
]
