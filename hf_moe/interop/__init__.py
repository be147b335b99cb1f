"""Foreign MoE checkpoints in and out: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4-MoE, DeepSeek-V3, dots.llm1, Solar
Open, GLM-4-MoE-Lite, MiniMax-M2, DeepSeek-V2, ERNIE-4.5-MoE, Hunyuan-MoE-V1, Hy3, Mistral 4, DeepSeek-V3.2,
GLM-MoE-DSA (GLM-5), Granite MoE (with and without its shared MLP) and FlexOlmo, exactly or not at all.

    model = HfMoeForCausalLM.from_pretrained("./Qwen3-30B-A3B")             # a transformers checkpoint folder
    model = HfMoeForCausalLM.from_pretrained("./Mixtral-8x7B", expert_parallel_size=8)   # this rank's experts only

and `hf-moe convert SRC OUT --to hf_moe|<family>|auto` (`conversions.convert`) rewrites checkpoints either way.

How a family is added (the contract; `families/mixtral.py` is the shortest example). A family is ONE
[`MoeFamily`] entry registered with [`register_family`] (built-in ones in `families/__init__.py`):

1. `model_type` and `architecture`: the transformers `model_type` it reads and the class name an export writes into
   `architectures` (serving engines pick their code by it).
2. Config both ways. `to_hf_moe(foreign_config) -> dict` gives `HfMoeConfig` keyword arguments computing exactly
   what the family's transformers class computes; `from_hf_moe(hf_moe_config) -> dict` gives the keyword arguments of
   the family's config class (`AutoConfig.for_model(model_type, **kwargs)`). The foreign config is always read by
   transformers' own class, so its defaults and derived fields are the ones its modeling code uses. Start both
   dicts from `common_to_hf_moe` / `common_from_hf_moe` (Llama's field names).
3. Refusals. Either function raises [`InteropError`] through `refuse(family, field, value, why)` for what it cannot
   express; `why` names a family that could. Two generic checks back them up: on import, any field of the foreign
   config outside `handled_fields` whose value is not the class default is refused (it might change the function);
   on export, the written config is mapped back with `to_hf_moe` and every difference in [`signature`] (what a
   config computes at inference) is refused, naming the field and the families whose round trip keeps it.
4. Tensor names. Non-MoE tensors keep hf-moe's (= Llama's) names unless `renames` (hf-moe regex → foreign
   replacement) says otherwise — an attention variant with other projections (MLA) lists them there, with the
   config fields that size them. Inside MoE layer `i`, `model.layers.{i}.mlp.` becomes
   `model.layers.{i}.{moe_module}.` and `router.weight`, `router.expert_bias`, `shared_experts.*`,
   `shared_expert_gate.weight` become the family's `router`, `expert_bias`, `shared_experts`, `shared_expert_gate`.
   Routed experts are read from the per-expert layout transformers 5 saves
   (`{moe_module}.{experts}.{e}.{gate|up|down}.weight`, names from `expert_names`) or from fused
   `{experts}.gate_up_proj [E, 2I, H]` / `{experts}.down_proj [E, H, I]`, and exported per expert. A family whose
   class saves them fused (Mistral 4, Granite) names its two fused tensors in `fused_experts`: exports write them so,
   imports read them so wherever a checkpoint has them. Shared experts may sit on the decoder layer instead
   (`shared_experts_in_layer`) and have their own projection names (`shared_expert_names`; one name for gate and
   up: one tensor, gate rows first). `ignored` names foreign tensors the family's own class does not load either
   (GLM's multi-token-prediction layers).
5. Tests: add the family's tiny transformers config to `tests/test_interop.py::FAMILIES`; every check there (logits,
   cached generate, both conversions, bit-exact round trip, refusals, expert-parallel load) then covers it.

Vision-language checkpoints whose language model is a family's (Qwen3-VL-MoE, GLM-4.5V, Mistral-Small-4's
`mistral3`, Kimi-K2.5: `wrappers.WRAPPERS`) import as that language model: the same reading, its tensors named as
the family names them, the vision tower's left out and named in a warning.

FP8 checkpoints (transformers' fine-grained `quant_method: "fp8"`: float8 weights beside `*_scale_inv` block scales)
need nothing from a family: `fp8.py` refuses what it cannot read exactly and `ForeignCheckpoint.read`, the one reader
of the direct load, the expert-parallel load and the conversions, dequantizes each tensor or expert as it reads it.
The model and every conversion's output are unquantized.

Decoder features an import needs (a new attention, norm or routing variant) are `HfMoeConfig` fields with
validation; the family maps onto them. A new field that changes what the model computes must also enter `signature`
(`family.py`), or exports to families lacking it would not be refused. transformers' own conversion machinery
(`conversion_mapping.py`, `core_model_loading.py`) is not reused: it converts inside transformers' load path on
whole tensors, so it cannot read one rank's expert rows or stream a conversion, and it is internal API that hf-moe
could not rely on across the transformers 5 versions it supports; the per-expert names it maps
(`experts.N.w1/w2/w3`, `experts.N.{gate,up,down}_proj`) are the ones used here.
"""

from .checkpoint import ForeignCheckpoint, checkpoint_model_type, to_hf_moe_config
from .export import export_config, families_for
from .families import BUILTIN_FAMILIES
from .family import (
    COMMON_FIELDS,
    FAMILIES,
    ExpertNames,
    InteropError,
    MoeFamily,
    common_from_hf_moe,
    common_to_hf_moe,
    differences,
    refuse,
    register_family,
    signature,
)
from .plan import TensorPlan, export_sources, tensor_plans
from .wrappers import WRAPPERS, VlmWrapper

for _family in BUILTIN_FAMILIES:
    register_family(_family)

__all__ = [
    "COMMON_FIELDS",
    "FAMILIES",
    "ExpertNames",
    "ForeignCheckpoint",
    "InteropError",
    "MoeFamily",
    "TensorPlan",
    "VlmWrapper",
    "WRAPPERS",
    "checkpoint_model_type",
    "common_from_hf_moe",
    "common_to_hf_moe",
    "differences",
    "export_config",
    "export_sources",
    "families_for",
    "refuse",
    "register_family",
    "signature",
    "tensor_plans",
    "to_hf_moe_config",
]
