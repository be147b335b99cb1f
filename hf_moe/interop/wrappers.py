"""Vision-language checkpoints whose language model is a registered family: the language model alone, exactly.

    model = HfMoeForCausalLM.from_pretrained("./Qwen3-VL-30B-A3B-Instruct")   # a qwen3_moe model, no vision tower

A [`VlmWrapper`] says, for one transformers vision-language `model_type`, which text models it wraps (the
`text_config`'s `model_type` → the family that reads it), how its text config becomes the family's config, where the
language model's tensors are (`model.language_model.*` or the older `language_model.model.*`, `lm_head.*`) and
which tensors belong to the vision tower and projector. Those are left out, counted and named in a warning; any
other tensor is kept under its own name, so the family's plan refuses it rather than drop a weight.

The wrapper's own `tie_word_embeddings` decides the head, as in transformers 5, which ties the head to the embeddings
only when the checkpoint holds no separate `lm_head.weight` (a stored head with other values is kept untied): a
stored head is therefore always read, and the head is tied only when the wrapper's config ties it and none is stored.

For text-only input the wrappers' multimodal RoPE (Qwen3-VL's interleaved sections, GLM-4.5V's contiguous ones)
gives the temporal, height and width positions the same text position; each frequency then rotates by that one
position, which is plain RoPE exactly, so the mRoPE sections drop out of the text model's config.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging

from ..checkpoint_files import SafetensorsReader, TensorInfo
from .family import FAMILIES, InteropError, MoeFamily, refuse, refuse_unread

logger = logging.get_logger(__name__)

_SCALE = "_scale_inv"
TRANSPOSED, FIRST_ROW, VISION = "transposed", "first row", "vision"
_EXPERTS = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)")
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")
# the multimodal token ids some releases repeat in their text_config; no text model reads them
_MEDIA_TOKENS = tuple(f"{media}_{part}token_id" for media in ("image", "video", "vision")
                      for part in ("", "start_", "end_"))
# fields of a text config that only say what the class is or how it was saved
_NOT_FAMILY_FIELDS = ("model_type", "architectures", "transformers_version", "base_config_key")


@dataclass(frozen=True)
class VlmWrapper:
    """One transformers vision-language `model_type` whose language model is a family's; `architecture` is the class
    whose text-only function the import reproduces.

    `text_models`: `(text_config.model_type, family model_type)` pairs; `text_fields(text_config)` gives the family
    config's keyword arguments (by default the text config's own fields: the text config is the family's class).
    `names`: `(regex, replacement)` pairs, the first that matches a stored tensor's name giving its family name;
    `vision`: regexes of the tensors outside the language model. `layout(stored name, family name, shape,
    text_config)` says how a tensor is stored where not as the family stores it: [`TRANSPOSED`] (its last two dims
    swapped), [`FIRST_ROW`] (the first row of a stack, kept as a `[1, ...]` row) or [`VISION`] (the vision tower's
    after all), `None` for as the family stores it.
    """

    model_type: str
    architecture: str
    text_models: tuple[tuple[str, str], ...]
    names: tuple[tuple[str, str], ...]
    vision: tuple[str, ...]
    text_fields: Callable[[PretrainedConfig], dict[str, Any]] | None = None
    layout: Callable[[str, str, tuple[int, ...], PretrainedConfig], str | None] | None = None

    def family_type(self, text_model_type: str | None) -> str:
        """The family that reads this wrapper's text model of `text_model_type` (None: the wrapper's default)."""
        if text_model_type is None:
            text_model_type = getattr(AutoConfig.for_model(self.model_type).get_text_config(), "model_type", None)
        families = dict(self.text_models)
        if text_model_type not in families:
            raise InteropError(
                f"{self.model_type}: text_config.model_type={text_model_type!r} is not a language model hf-moe "
                f"imports from a {self.model_type} checkpoint; it imports {', '.join(sorted(families))} (the text "
                f"models of the families {', '.join(sorted(set(families.values())))}).")
        return families[text_model_type]

    def language_model(self, config: PretrainedConfig,
                       reader: SafetensorsReader) -> tuple[MoeFamily, PretrainedConfig, LanguageModelTensors]:
        """(the family, its config of the language model, its tensors under the family's names) of a checkpoint of
        this wrapper with config `config` and files `reader`."""
        tensors = LanguageModelTensors(self, reader, config.get_text_config())
        family, family_config = self.family_config(config, head_stored="lm_head.weight" in tensors)
        if tensors.left_out:
            kinds = sorted({re.sub(r"\.(weight|bias)$", "", re.sub(r"\.\d+\.", ".*.", n)) for n in tensors.left_out})
            listed = ", ".join(kinds[:6]) + (f" and {len(kinds) - 6} more" if len(kinds) > 6 else "")
            logger.warning(f"{self.model_type} checkpoint {reader.folder}: the language model is read; the "
                           f"{len(tensors.left_out)} tensors of the vision tower and projector are left out "
                           f"({listed}).")
        return family, family_config, tensors

    def family_config(self, config: PretrainedConfig, head_stored: bool) -> tuple[MoeFamily, PretrainedConfig]:
        """(the family, its config) of the language model of a wrapper config `config`, whose checkpoint stores a
        head of its own or not (`head_stored`)."""
        text = config.get_text_config()
        family = FAMILIES[self.family_type(getattr(text, "model_type", None))]
        fields = self.text_fields(text) if self.text_fields else dict(text.to_dict())
        for name in _NOT_FAMILY_FIELDS:
            fields.pop(name, None)
        fields["tie_word_embeddings"] = bool(config.tie_word_embeddings) and not head_stored
        fields["dtype"] = getattr(text, "dtype", None) or getattr(config, "dtype", None)
        if getattr(config, "quantization_config", None) is not None:
            fields["quantization_config"] = config.quantization_config
        try:
            return family, family.foreign_config(**fields)
        except (TypeError, ValueError) as err:
            if isinstance(err, InteropError):
                raise
            raise InteropError(f"{self.model_type}: its text_config does not make a {family.model_type} config: "
                               f"{err}") from err


class LanguageModelTensors:
    """The language model's tensors in a wrapper's checkpoint, named as the family names them: the part of
    [`SafetensorsReader`]'s interface the interop readers use (`tensors`, `get`, `get_many`). A tensor stored in
    another layout (`VlmWrapper.layout`) is read in the family's; the vision tower's tensors are left out
    (`left_out`: their stored names)."""

    def __init__(self, wrapper: VlmWrapper, reader: SafetensorsReader, text: PretrainedConfig) -> None:
        self._reader = reader
        self._sources: dict[str, tuple[str, str | None]] = {}  # family name → (stored name, layout)
        self.tensors: dict[str, TensorInfo] = {}
        self.left_out: list[str] = []
        for stored, info in reader.tensors.items():
            name = None if any(re.match(p, stored) for p in wrapper.vision) else _renamed(wrapper.names, stored)
            how = wrapper.layout(stored, name, tuple(info.shape), text) if name and wrapper.layout else None
            if name is None or how == VISION:
                self.left_out.append(stored)
                continue
            if name in self._sources:
                raise InteropError(f"{reader.folder}: {stored} and {self._sources[name][0]} are both the language "
                                   f"model's {name}; a checkpoint holds each tensor once.")
            shape = tuple(info.shape)
            if how == TRANSPOSED:
                shape = (*shape[:-2], shape[-1], shape[-2])
            elif how == FIRST_ROW:
                shape = (1, *shape[1:])
            self._sources[name] = (stored, how)
            self.tensors[name] = TensorInfo(info.file, shape, info.dtype)
        scaled = sorted(stored for stored, how in self._sources.values() if how and stored + _SCALE in reader.tensors)
        if scaled:
            raise InteropError(f"{reader.folder}: FP8 tensors stored in another layout than the family's "
                               f"({scaled[:2]}); hf-moe reads the block scales of tensors stored as the family's.")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """The tensor `name` (rows `[start, end)` of its dim 0 when given) in the family's layout."""
        stored, how = self._sources[name]
        if how == FIRST_ROW:
            return self._reader.get(stored, 0, 1)[start:end]
        if how == TRANSPOSED and len(self._reader.tensors[stored].shape) == 2:  # rows of the transpose: read it all
            return self._reader.get(stored).T.contiguous()[start:end]
        value = self._reader.get(stored, start, end)
        return value.transpose(-1, -2).contiguous() if how == TRANSPOSED else value

    def get_many(self, names: list[str]) -> list[torch.Tensor]:
        if any(self._sources[name][1] for name in names):
            return [self.get(name) for name in names]
        return self._reader.get_many([self._sources[name][0] for name in names])


def _renamed(names: tuple[tuple[str, str], ...], stored: str) -> str:
    for pattern, replacement in names:
        if re.match(pattern, stored):
            return re.sub(pattern, replacement, stored, count=1)
    return stored


def _transposed_experts(stored: str, name: str, shape: tuple[int, ...], text: PretrainedConfig) -> str | None:
    """Qwen3-VL-MoE's release stores its fused experts as `[E, H, 2I]` / `[E, I, H]`, transposed relative to the
    `[E, 2I, H]` / `[E, H, I]` transformers' model holds (and saves); as transformers' loader does, a shape equal to
    the model's is read as is, the transposed one transposed."""
    match = _EXPERTS.fullmatch(name)
    if match is None or len(shape) != 3:
        return None
    rows = 2 * text.moe_intermediate_size if match.group(1) == "gate_up_proj" else text.hidden_size
    cols = text.hidden_size if match.group(1) == "gate_up_proj" else text.moe_intermediate_size
    return TRANSPOSED if tuple(shape[1:]) == (cols, rows) and rows != cols else None


def _text_fields(text: PretrainedConfig) -> dict[str, Any]:
    """The text config's fields less the mRoPE sections (plain RoPE for text: see the module docstring) and the
    multimodal token ids."""
    fields = {k: v for k, v in text.to_dict().items() if k not in _MEDIA_TOKENS}
    fields["rope_parameters"] = {k: v for k, v in (text.rope_parameters or {}).items() if k not in _MROPE_KEYS}
    return fields


def qwen3_vl_moe_text(text: PretrainedConfig) -> dict[str, Any]:
    """Qwen3-VL-MoE's text model as Qwen3-MoE: the same decoder, its router always renormalising the top-k weights
    (transformers' class reads no `norm_topk_prob`; a release's `false` is refused)."""
    refuse_unread("qwen3_vl_moe", text, {"norm_topk_prob": True})
    fields = {**_text_fields(text), "norm_topk_prob": True}
    fields["num_experts"] = fields.pop("num_local_experts", text.num_experts)
    return fields


def glm4v_moe_text(text: PretrainedConfig) -> dict[str, Any]:
    """GLM-4.5V's text model as GLM-4-MoE: the same decoder without q/k norm (transformers' class reads no
    `use_qk_norm`; a release's `true` is refused)."""
    refuse_unread("glm4v_moe", text, {"use_qk_norm": False})
    return {**_text_fields(text), "use_qk_norm": False}


def ernie4_5_vl_moe_text(text: PretrainedConfig) -> dict[str, Any]:
    """ERNIE-4.5-VL's text model as ERNIE-4.5-MoE: its text experts (the first width of `moe_intermediate_size`),
    routed by the text router, are the model for text; the MoE layers `mlp_layer_types` names become ERNIE-4.5's
    start, end and interval (their own fields, which transformers' class does not read, must agree)."""
    types = text.mlp_layer_types
    sparse = [i for i, kind in enumerate(types) if kind == "sparse"]
    layers = next(({"moe_layer_start_index": sparse[0], "moe_layer_end_index": sparse[-1], "moe_layer_interval": n}
                   for n in range(1, len(types) + 1)
                   if sparse and [i for i in range(sparse[0], sparse[-1] + 1) if (i + 1) % n == 0] == sparse), None)
    if layers is None:
        raise refuse("ernie4_5_vl_moe", "mlp_layer_types", types,
                     "ERNIE-4.5's MoE layers are every moe_layer_interval-th layer between two indices")
    refuse_unread("ernie4_5_vl_moe", text, layers)
    fields = {k: v for k, v in _text_fields(text).items() if k != "mlp_layer_types"}
    return {**fields, **layers, "moe_intermediate_size": text.moe_intermediate_size[0]}


def _ernie_layout(stored: str, name: str, shape: tuple[int, ...], text: PretrainedConfig) -> str | None:
    """ERNIE-4.5-VL's release (which transformers' save writes back) stores the text and vision experts of a layer as
    experts `0 … E-1` and `E … 2E-1`, the text router as `mlp.gate.weight [H, E]` (transposed; the vision router is
    `weight_1`) and both routers' expert biases as the rows of one `[2, E]` `mlp.moe_statics` tensor."""
    expert = re.fullmatch(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\..+", stored)
    if expert is not None:
        return VISION if int(expert.group(1)) >= text.moe_num_experts else None
    if re.fullmatch(r"model\.layers\.\d+\.mlp\.gate\.weight", stored):
        return TRANSPOSED
    if re.fullmatch(r"model\.layers\.\d+\.mlp\.moe_statics\.e_score_correction_bias", stored) and len(shape) == 2:
        return FIRST_ROW
    return None


_IN_MEMORY = ((r"model\.language_model\.", "model."),)  # transformers 5's module names, which it saves for these
_LLAVA = ((r"language_model\.model\.", "model."), (r"language_model\.lm_head\.", "lm_head."), *_IN_MEMORY)

QWEN3_VL_MOE = VlmWrapper(
    model_type="qwen3_vl_moe",
    architecture="Qwen3VLMoeForConditionalGeneration",
    text_models=(("qwen3_vl_moe_text", "qwen3_moe"),),
    names=_IN_MEMORY,
    vision=(r"model\.visual\.",),
    text_fields=qwen3_vl_moe_text,
    layout=_transposed_experts,
)
GLM4V_MOE = VlmWrapper(
    model_type="glm4v_moe",
    architecture="Glm4vMoeForConditionalGeneration",
    text_models=(("glm4v_moe_text", "glm4_moe"),),
    names=_IN_MEMORY,
    vision=(r"model\.visual\.",),
    text_fields=glm4v_moe_text,
)
# GLM-4.6V's wrapper, around any GLM text model: the MoE one imports, as GLM-4.5V's
GLM46V = replace(GLM4V_MOE, model_type="glm46v", architecture="Glm46VForConditionalGeneration")
MISTRAL3 = VlmWrapper(
    model_type="mistral3",
    architecture="Mistral3ForConditionalGeneration",
    text_models=(("mistral4", "mistral4"),),
    names=_LLAVA,
    vision=(r"(model\.)?(vision_tower|multi_modal_projector)\.",),
)
KIMI_K25 = VlmWrapper(
    model_type="kimi_k25",
    architecture="Kimi_K25ForConditionalGeneration",
    text_models=(("deepseek_v3", "deepseek_v3"), ("kimi_k2", "deepseek_v3")),  # its config reads kimi_k2 so
    # transformers' loader renames every `blocks` to `layers`, and its save writes the language model's layers so
    names=((r"language_model\.model\.blocks\.", "model.layers."), *_LLAVA),
    vision=(r"(model\.)?(vision_tower|mm_projector)\.",),
)
ERNIE4_5_VL_MOE = VlmWrapper(
    model_type="ernie4_5_vl_moe",
    architecture="Ernie4_5_VLMoeForConditionalGeneration",
    text_models=(("ernie4_5_vl_moe_text", "ernie4_5_moe"),),
    names=((r"model\.language_model\.layers\.(\d+)\.mlp\.text_moe\.gate\.moe_statics\.",
            r"model.layers.\1.mlp.moe_statics."),
           (r"model\.language_model\.layers\.(\d+)\.mlp\.text_moe\.", r"model.layers.\1.mlp."), *_IN_MEMORY),
    vision=(r"(model\.)?(vision_model|vision_tower|resampler_model)\.", r"model\.layers\.\d+\.mlp\.gate\.weight_1$",
            r"model\.language_model\.layers\.\d+\.mlp\.vision_moe\."),
    text_fields=ernie4_5_vl_moe_text,
    layout=_ernie_layout,
)

WRAPPERS: dict[str, VlmWrapper] = {w.model_type: w for w in (QWEN3_VL_MOE, GLM4V_MOE, GLM46V, MISTRAL3, KIMI_K25,
                                                             ERNIE4_5_VL_MOE)}
"""transformers vision-language `model_type` → [`VlmWrapper`]: the checkpoints whose language model hf-moe imports."""
