"""The built-in foreign families, one entry each (see `hf_moe.interop` for the contract)."""

from .deepseek_v2 import DEEPSEEK_V2
from .deepseek_v3 import DEEPSEEK_V3
from .ernie4_5_moe import ERNIE4_5_MOE
from .glm4_moe import GLM4_MOE
from .hunyuan_v1_moe import HUNYUAN_V1_MOE
from .mixtral import MIXTRAL
from .olmoe import OLMOE
from .qwen_moe import QWEN2_MOE, QWEN3_MOE

BUILTIN_FAMILIES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, GLM4_MOE, DEEPSEEK_V3, DEEPSEEK_V2, ERNIE4_5_MOE,
                    HUNYUAN_V1_MOE)

__all__ = ["BUILTIN_FAMILIES", "DEEPSEEK_V2", "DEEPSEEK_V3", "ERNIE4_5_MOE", "GLM4_MOE", "HUNYUAN_V1_MOE", "MIXTRAL",
           "OLMOE", "QWEN2_MOE", "QWEN3_MOE"]
