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
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging

from ..checkpoint_files import SafetensorsReader, TensorInfo
from .family import FAMILIES, InteropError, MoeFamily, refuse_unread

logger = logging.get_logger(__name__)

_SCALE = "_scale_inv"
_EXPERTS = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)")
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")
# the multimodal token ids some releases repeat in their text_config; no text model reads them
_MEDIA_TOKENS = tuple(f"{media}_{part}token_id" for media in ("image", "video", "vision")
                      for part in ("", "start_", "end_"))
# fields of a text config that only say what the class is or how it was saved
_NOT_FAMILY_FIELDS = ("model_type", "architectures", "transformers_version", "base_config_key")


@dataclass(frozen=True)
class VlmWrapper:
    """One transformers vision-language `model_type` whose language model is a family's.

    `text_models`: `(text_config.model_type, family model_type)` pairs; `text_fields(text_config)` gives the family
    config's keyword arguments (by default the text config's own fields: the text config is the family's class).
    `names`: `(regex, replacement)` pairs, the first that matches a stored tensor's name giving its family name;
    `vision`: regexes of the tensors outside the language model. `transposed_experts`: fused expert tensors may be
    stored as `[E, H, 2I]` / `[E, I, H]` (Qwen3-VL-MoE's release) and are read transposed where their shape says so,
    as transformers' loader does (a shape equal to the model's is read as is).
    """

    model_type: str
    architecture: str
    text_models: tuple[tuple[str, str], ...]
    names: tuple[tuple[str, str], ...]
    vision: tuple[str, ...]
    text_fields: Callable[[PretrainedConfig], dict[str, Any]] | None = None
    transposed_experts: bool = False

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
        return (*self.family_config(config, head_stored="lm_head.weight" in tensors), tensors)

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
    [`SafetensorsReader`]'s interface the interop readers use (`tensors`, `get`, `get_many`). A tensor stored
    transposed is read transposed; the vision tower's tensors are left out and named in a warning."""

    def __init__(self, wrapper: VlmWrapper, reader: SafetensorsReader, text: PretrainedConfig) -> None:
        self.folder = reader.folder
        self._reader = reader
        self._sources: dict[str, tuple[str, bool]] = {}  # family name → (stored name, transposed)
        self.tensors: dict[str, TensorInfo] = {}
        vision = []
        for stored, info in reader.tensors.items():
            if any(re.match(pattern, stored) for pattern in wrapper.vision):
                vision.append(stored)
                continue
            name = _renamed(wrapper.names, stored)
            if name in self._sources:
                raise InteropError(f"{reader.folder}: {stored} and {self._sources[name][0]} are both the language "
                                   f"model's {name}; a checkpoint holds each tensor once.")
            transposed = wrapper.transposed_experts and _transposed_expert(name, info.shape, text)
            shape = (*info.shape[:-2], info.shape[-1], info.shape[-2]) if transposed else info.shape
            self._sources[name] = (stored, transposed)
            self.tensors[name] = TensorInfo(info.file, tuple(shape), info.dtype)
        scaled = sorted(stored for stored, transposed in self._sources.values()
                        if transposed and stored + _SCALE in reader.tensors)
        if scaled:
            raise InteropError(f"{reader.folder}: FP8 expert tensors stored transposed ({scaled[:2]}); hf-moe reads "
                               "block scales of tensors in the layout transformers holds them only.")
        if vision:
            prefixes = sorted({".".join(name.split(".")[:2]) for name in vision})
            logger.warning(f"{wrapper.model_type} checkpoint {reader.folder}: the language model is read; the "
                           f"{len(vision)} tensors of the vision tower and projector ({', '.join(prefixes[:6])}) "
                           "are left out.")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """The tensor `name` (rows `[start, end)` of its dim 0 when given) in the family's layout."""
        stored, transposed = self._sources[name]
        value = self._reader.get(stored, start, end)
        return value.transpose(-1, -2).contiguous() if transposed else value

    def get_many(self, names: list[str]) -> list[torch.Tensor]:
        if any(self._sources[name][1] for name in names):
            return [self.get(name) for name in names]
        return self._reader.get_many([self._sources[name][0] for name in names])


def _renamed(names: tuple[tuple[str, str], ...], stored: str) -> str:
    for pattern, replacement in names:
        if re.match(pattern, stored):
            return re.sub(pattern, replacement, stored, count=1)
    return stored


def _transposed_expert(name: str, shape: tuple[int, ...], text: PretrainedConfig) -> bool:
    """Whether the fused expert tensor `name` of `shape` is stored transposed: its last two dims swapped relative to
    the `[E, 2I, H]` / `[E, H, I]` transformers' model holds (a shape equal to the model's is not)."""
    match = _EXPERTS.fullmatch(name)
    if match is None or len(shape) != 3:
        return False
    rows = 2 * text.moe_intermediate_size if match.group(1) == "gate_up_proj" else text.hidden_size
    cols = text.hidden_size if match.group(1) == "gate_up_proj" else text.moe_intermediate_size
    return tuple(shape[1:]) == (cols, rows) and (rows, cols) != (cols, rows)


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


_IN_MEMORY = ((r"model\.language_model\.", "model."),)  # transformers 5's module names, which it saves for these
_LLAVA = ((r"language_model\.model\.", "model."), (r"language_model\.lm_head\.", "lm_head."), *_IN_MEMORY)

QWEN3_VL_MOE = VlmWrapper(
    model_type="qwen3_vl_moe",
    architecture="Qwen3VLMoeForConditionalGeneration",
    text_models=(("qwen3_vl_moe_text", "qwen3_moe"),),
    names=_IN_MEMORY,
    vision=(r"model\.visual\.",),
    text_fields=qwen3_vl_moe_text,
    transposed_experts=True,
)
GLM4V_MOE = VlmWrapper(
    model_type="glm4v_moe",
    architecture="Glm4vMoeForConditionalGeneration",
    text_models=(("glm4v_moe_text", "glm4_moe"),),
    names=_IN_MEMORY,
    vision=(r"model\.visual\.",),
    text_fields=glm4v_moe_text,
)
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

WRAPPERS: dict[str, VlmWrapper] = {w.model_type: w for w in (QWEN3_VL_MOE, GLM4V_MOE, MISTRAL3, KIMI_K25)}
"""transformers vision-language `model_type` → [`VlmWrapper`]: the checkpoints whose language model hf-moe imports."""
