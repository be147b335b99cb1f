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

from . import parallel  # noqa: F401  (`hf_moe.parallel.finish_gradients` etc. after a plain `import hf_moe`)
from .configuration_hf_moe import HfMoeConfig
from .decode_graphs import CUDAGraphConfig, default_graph_decoding
from .interop import InteropError, MoeFamily, register_family
from .linear_attention import GatedDeltaNet, GatedDeltaNetSizes
from .modeling_hf_moe import (
    HfMoeForCausalLM,
    HfMoeForSequenceClassification,
    HfMoeModel,
    HfMoePreTrainedModel,
)
from .modeling_outputs import HfMoeCausalLMOutputWithPast
from .moe.block import HfMoeSparseMoeBlock, moe_blocks, record_routing
from .moe.capacity import expert_capacity
from .moe.cuda_graphs import capture_moe_cuda_graphs, release_moe_cuda_graphs
from .moe.experts import (
    LIGER_AVAILABLE,
    HfMoeExperts,
    HfMoeNonGatedExperts,
    capacity_padded_experts_forward,
    gathered_experts_forward,
    grouped_experts_forward,
    liger_fused_experts_forward,
)
from .moe.metrics import router_metrics
from .moe.router.expert_choice import ExpertChoiceRouter
from .moe.router.losses import load_balancing_loss, router_z_loss, sequence_load_balancing_loss
from .moe.router.product_key import ProductKeyRouter, product_key_top_k
from .moe.router.registry import ROUTER_CLASSES, register_router
from .moe.router.topk import HfMoeRouter, SwitchRouter
from .moe.router.unlearned import FakeBalancedRouter, HashRouter
from .moe.types import RouterOutput
from .parallel.balancing import update_expert_bias
from .parallel.fsdp import fully_shard_moe
from .row_sparse_adamw import RowSparseAdamW, row_sparse_parameters

__version__ = "0.1.0"

AutoConfig.register(HfMoeConfig.model_type, HfMoeConfig, exist_ok=True)
AutoModel.register(HfMoeConfig, HfMoeModel, exist_ok=True)
AutoModelForCausalLM.register(HfMoeConfig, HfMoeForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HfMoeConfig, HfMoeForSequenceClassification, exist_ok=True)

__all__ = [
    "CUDAGraphConfig",
    "default_graph_decoding",
    "capture_moe_cuda_graphs",
    "release_moe_cuda_graphs",
    "ROUTER_CLASSES",
    "ExpertChoiceRouter",
    "FakeBalancedRouter",
    "GatedDeltaNet",
    "GatedDeltaNetSizes",
    "HashRouter",
    "InteropError",
    "MoeFamily",
    "HfMoeCausalLMOutputWithPast",
    "HfMoeConfig",
    "HfMoeExperts",
    "HfMoeNonGatedExperts",
    "HfMoeForCausalLM",
    "HfMoeForSequenceClassification",
    "HfMoeModel",
    "HfMoePreTrainedModel",
    "HfMoeRouter",
    "ProductKeyRouter",
    "HfMoeSparseMoeBlock",
    "LIGER_AVAILABLE",
    "RouterOutput",
    "RowSparseAdamW",
    "SwitchRouter",
    "capacity_padded_experts_forward",
    "expert_capacity",
    "fully_shard_moe",
    "gathered_experts_forward",
    "grouped_experts_forward",
    "liger_fused_experts_forward",
    "load_balancing_loss",
    "product_key_top_k",
    "moe_blocks",
    "record_routing",
    "register_family",
    "register_router",
    "router_metrics",
    "router_z_loss",
    "row_sparse_parameters",
    "sequence_load_balancing_loss",
    "update_expert_bias",
]
