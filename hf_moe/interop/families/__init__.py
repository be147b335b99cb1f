"""The built-in foreign families, one entry each (see `hf_moe.interop` for the contract)."""

from .deepseek_v2 import DEEPSEEK_V2
from .deepseek_v3 import DEEPSEEK_V3
from .deepseek_v32 import DEEPSEEK_V32
from .dots1 import DOTS1
from .ernie4_5_moe import ERNIE4_5_MOE
from .flex_olmo import FLEX_OLMO
from .glm4_moe import GLM4_MOE
from .glm4_moe_lite import GLM4_MOE_LITE
from .glm_moe_dsa import GLM_MOE_DSA
from .granitemoe import GRANITEMOE, GRANITEMOESHARED
from .hunyuan_v1_moe import HUNYUAN_V1_MOE
from .hy_v3 import HY_V3
from .minimax_m2 import MINIMAX_M2
from .mistral4 import MISTRAL4
from .mixtral import MIXTRAL
from .olmoe import OLMOE
from .qwen_moe import QWEN2_MOE, QWEN3_MOE
from .solar_open import SOLAR_OPEN

BUILTIN_FAMILIES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, GLM4_MOE, DEEPSEEK_V3, DOTS1, SOLAR_OPEN, GLM4_MOE_LITE,
                    MINIMAX_M2, DEEPSEEK_V2, ERNIE4_5_MOE, HUNYUAN_V1_MOE, HY_V3, MISTRAL4, DEEPSEEK_V32, GLM_MOE_DSA,
                    GRANITEMOE, GRANITEMOESHARED, FLEX_OLMO)

__all__ = ["BUILTIN_FAMILIES", "DEEPSEEK_V2", "DEEPSEEK_V3", "DEEPSEEK_V32", "DOTS1", "ERNIE4_5_MOE", "FLEX_OLMO",
           "GLM4_MOE", "GLM4_MOE_LITE", "GLM_MOE_DSA", "GRANITEMOE", "GRANITEMOESHARED", "HUNYUAN_V1_MOE", "HY_V3",
           "MINIMAX_M2", "MISTRAL4", "MIXTRAL", "OLMOE", "QWEN2_MOE", "QWEN3_MOE", "SOLAR_OPEN"]
