"""Checkpoint conversion between hf-moe and the foreign MoE families (`hf_moe.interop.FAMILIES`), either way, exactly
or not at all.

    from conversions import convert
    convert("./Qwen3-30B-A3B", "./qwen3-hf-moe")                 # import: an hf-moe checkpoint
    convert("./my-finetune", "./my-finetune-qwen3", to="qwen3_moe")  # export: what transformers and vLLM load

Every tensor is planned first (`hf_moe.interop`: the family's config mapping and tensor names), then streamed: one
source tensor, or one expert of one, at a time, into shards whose headers are written up front, so peak memory is
about one tensor, never the model. Output appears complete or not at all (`conversions.output`). An export writes the
expert layout (per expert, or fused for Mistral 4 and Granite) and `architectures` transformers 5 saves for the
family, and anything the family cannot express is refused before anything is written, naming the field and the
families that could take it. An FP8 source (`quantization_config` `quant_method: "fp8"`) is dequantized as it is read
and written unquantized, in its compute dtype or `dtype`, without `quantization_config`; re-quantizing is not done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_moe import HfMoeConfig
from hf_moe.checkpoint_files import CheckpointError, SafetensorsReader
from hf_moe.interop import (
    FAMILIES,
    WRAPPERS,
    ForeignCheckpoint,
    checkpoint_model_type,
    export_config,
    export_sources,
    families_for,
    tensor_plans,
)

from .convert_types import ConvertError, ConvertResult
from .model_card import render_conversion_card, source_card_fields
from .output import atomic_output, check_output, copy_side_files
from .safetensors_io import PlannedTensor, parse_size, plan_shards, whole, write_shards
from .sources import expected_shapes
from .upcycle_types import DTYPE_NAMES

TARGETS = ("hf_moe", *FAMILIES, "auto")
"""What `convert(..., to=...)` writes: hf-moe's own layout, a foreign family's, or `auto`."""
_EXPERT_BIAS = ".router.expert_bias"  # float32 in every model (selection scores), whatever the weights' dtype

Read = Callable[[str, int | None, int | None], torch.Tensor]


@dataclass
class _Source:
    """A checkpoint folder seen as hf-moe tensors: its type, hf-moe config, and a reader of hf-moe tensors (or of
    experts `[start, end)` of one) with their source dtypes."""

    path: Path
    model_type: str
    config: HfMoeConfig
    read: Read
    dtypes: dict[str, torch.dtype]

    @classmethod
    def open(cls, path: Path) -> _Source:
        model_type = checkpoint_model_type(path)
        if model_type is None:
            raise CheckpointError(f"{path} has no config.json; expected a transformers checkpoint folder.")
        if model_type == "hf_moe":
            config = HfMoeConfig.from_pretrained(path)
            reader = SafetensorsReader(path)
            _check_hf_moe_tensors(path, reader, expected_shapes(config))
            return cls(path, model_type, config, reader.get, {n: i.dtype for n, i in reader.tensors.items()})
        if model_type not in FAMILIES:
            raise ConvertError(f"{path}: model_type={model_type!r} is not an MoE family hf-moe converts (supported: "
                               f"hf_moe, {', '.join(FAMILIES)}); dense checkpoints become MoE with `hf-moe upcycle`.")
        checkpoint = ForeignCheckpoint.open(path)
        config = checkpoint.hf_moe_config()
        plans = {p.name: p for p in checkpoint.plans(expected_shapes(config), config)}
        dtypes = {name: checkpoint.dtype(p) for name, p in plans.items()}
        return cls(path, model_type, config, lambda name, s=None, e=None: checkpoint.read(plans[name], s, e), dtypes)


def _check_hf_moe_tensors(path: Path, reader: SafetensorsReader, expected: dict[str, tuple[int, ...]]) -> None:
    have = {n: i.shape for n, i in reader.tensors.items()}
    missing = sorted(set(expected) - set(have))
    extra = sorted(set(have) - set(expected) - {"lm_head.weight"})
    wrong = [f"{n}: {list(have[n])} (expected {list(s)})" for n, s in expected.items() if n in have and have[n] != s]
    if missing or extra or wrong:
        raise CheckpointError(f"{path}: the tensors do not match config.json (missing {missing[:4]}, unexpected "
                              f"{extra[:4]}, shapes {wrong[:4]}).")


def _target(source: _Source, to: str) -> str:
    if to in WRAPPERS:
        families = ", ".join(sorted({family for _, family in WRAPPERS[to].text_models}))
        raise ConvertError(f"to={to!r}: hf-moe writes a language model, not a {to} checkpoint with its vision tower; "
                           f"export the language model as its family ({families}, or to='auto'), and keep the "
                           "original checkpoint for the vision tower.")
    if to not in TARGETS:
        raise ConvertError(f"to={to!r} is invalid: expected one of {', '.join(TARGETS)}.")
    if to != "auto":
        return to
    if source.model_type in FAMILIES:
        return source.model_type
    exact = families_for(source.config)
    return exact[0] if exact else "hf_moe"


def _dtype(name: str) -> torch.dtype | None:
    if str(name) not in DTYPE_NAMES:
        raise ConvertError(f"dtype={name!r} is invalid: expected one of {', '.join(DTYPE_NAMES)}.")
    return DTYPE_NAMES[str(name)] and getattr(torch, DTYPE_NAMES[str(name)])


def _planned(source: _Source, target: str, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """Every output tensor with a producer that reads the source lazily (one expert at a time for expert tensors,
    written per expert or fused)."""
    expected = expected_shapes(source.config)

    def out_dtype(hf_name: str) -> torch.dtype:
        return source.dtypes[hf_name] if dtype is None or hf_name.endswith(_EXPERT_BIAS) else dtype

    def experts(name: str, count: int) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: (source.read(name, e, e + 1).to(out_dtype(name)) for e in range(count))

    if target == "hf_moe":
        return [PlannedTensor(name, shape, out_dtype(name),
                              experts(name, shape[0]) if name.endswith(("experts.gate_up_proj", "experts.down_proj"))
                              else whole(lambda name=name: source.read(name).to(out_dtype(name))))
                for name, shape in expected.items()]

    def block(hf_name: str, expert: int | None, rows: slice | None, shape: tuple[int, ...]) -> torch.Tensor:
        """One block of rows (see `export_sources`) of a foreign tensor of `shape`."""
        value = source.read(hf_name) if expert is None else source.read(hf_name, expert, expert + 1)
        return (value if rows is None else value[0, rows]).to(out_dtype(hf_name)).reshape(-1, *shape[1:])

    def blocks(parts: list[tuple], shape: tuple[int, ...]) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: (block(*part, shape) for part in parts)

    plans = tensor_plans(FAMILIES[target], expected, source.config.moe_layer_indices)
    return [PlannedTensor(foreign, tuple(shape), out_dtype(parts[0][0]), blocks(parts, tuple(shape)))
            for foreign, shape, parts in export_sources(plans)]


def convert(src: str | os.PathLike, out: str | os.PathLike, to: str = "hf_moe", *, dtype: str = "auto",
            max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True,
            base_model: str | None = None) -> ConvertResult:
    """Convert the MoE checkpoint folder `src` (hf_moe or a foreign family) into `out` in the layout `to`:
    `"hf_moe"` (default), a family (a key of `hf_moe.interop.FAMILIES`: `"mixtral"`, `"qwen3_moe"`, ...) or `"auto"`
    (the source's own family for a foreign source, else the first family that expresses the model exactly, else
    hf_moe). `dtype` is `"auto"` (each tensor's own) or a float dtype
    name; the expert bias stays float32.

    Validates and plans everything before writing; raises `ConvertError`/`InteropError` (a `ValueError`) naming the
    field or tensor that cannot be converted exactly, `CheckpointError` for unreadable sources. Tokenizer, chat
    template and generation config are copied; a README.md model card is written.
    """
    src, out = Path(src), Path(out)
    source = _Source.open(src)
    target = _target(source, to)
    out_dtype = _dtype(dtype)
    out_config = source.config if target == "hf_moe" else export_config(source.config, target)
    if target == "hf_moe":
        out_config.architectures = ["HfMoeForCausalLM"]
    card_fields = source_card_fields(src)
    check_output(src, out, overwrite, ConvertError)
    try:
        shard_size = parse_size(max_shard_size)
    except ValueError as err:
        raise ConvertError(str(err)) from None
    shards = plan_shards(_planned(source, target, out_dtype), shard_size)
    tensors = [t for shard in shards for t in shard]
    with atomic_output(out, "converting") as tmp:
        if out_dtype is not None:
            out_config.dtype = out_dtype
        out_config.save_pretrained(tmp)
        with tqdm(total=len(tensors), unit="tensor", desc=f"{source.model_type} -> {target}",
                  disable=not progress) as bar:
            write_shards(tmp, shards, lambda shard, t: bar.update())
        copied, skipped = copy_side_files(src, tmp)
        result = ConvertResult(out, source.model_type, target, out_config, sum(t.numel for t in tensors),
                               len(shards), dtype if out_dtype is not None else None, copied, skipped)
        render_conversion_card(result, src, base_model, card_fields).save(tmp / "README.md")
    return result


__all__ = ["TARGETS", "ConvertError", "ConvertResult", "convert"]
