"""Where each hf-moe tensor's values are in a foreign checkpoint, and each foreign tensor's in an hf-moe one.

A plan is built from the names and shapes an hf-moe model expects (its meta-device state dict) and a family's names,
so the same plan drives a direct load, an expert-parallel load (each rank reads its experts' rows only) and a
streaming conversion either way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .family import InteropError, MoeFamily

_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_RECOMPUTED = (".rotary_emb.inv_freq",)  # buffers older checkpoints carry; the model recomputes them


@dataclass(frozen=True)
class TensorPlan:
    """One hf-moe tensor and the foreign tensors that hold its values.

    `sources[e]` are the foreign tensors of expert `e` concatenated along their dim 0 (`per_expert`: gate then up
    for `gate_up_proj`, down for `down_proj`); otherwise `sources == ((name,),)`, one foreign tensor of the same
    shape (the routed experts' fused tensor when `experts`, read by expert rows), or of `foreign_shape` when set:
    the same values in another shape (ERNIE-4.5's `[1, E]` expert bias)."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[tuple[str, ...], ...]
    experts: bool = False
    per_expert: bool = False
    foreign_shape: tuple[int, ...] | None = None

    @property
    def foreign_names(self) -> list[str]:
        return [name for parts in self.sources for name in parts]


def tensor_plans(family: MoeFamily, expected: dict[str, tuple[int, ...]], moe_layers: Iterable[int],
                 fused: set[str] = frozenset()) -> list[TensorPlan]:
    """The plan of every hf-moe tensor in `expected` (name → full shape). Routed experts are read from the per-expert
    layout transformers 5 saves, or from the fused tensor when its foreign name is in `fused`."""
    moe = set(moe_layers)
    plans = []
    for name, shape in expected.items():
        match = _EXPERTS.fullmatch(name)
        if match is None:
            as_row = family.expert_bias_as_row and name.endswith(".router.expert_bias")
            plans.append(TensorPlan(name, shape, ((family.foreign_name(name, moe),),),
                                    foreign_shape=(1, *shape) if as_row else None))
            continue
        layer, part = match.groups()
        prefix = f"model.layers.{layer}.{family.moe_module}.{family.experts}."
        if prefix + part in fused:
            plans.append(TensorPlan(name, shape, ((prefix + part,),), experts=True))
            continue
        names = family.expert_names
        projections = (names.gate, names.up) if part == "gate_up_proj" else (names.down,)
        sources = tuple(tuple(f"{prefix}{e}.{p}.weight" for p in projections) for e in range(shape[0]))
        plans.append(TensorPlan(name, shape, sources, experts=True, per_expert=True))
    return plans


def export_plans(family: MoeFamily, expected: dict[str, tuple[int, ...]],
                 moe_layers: Iterable[int]) -> list[TensorPlan]:
    """The plans of an export to `family`: routed experts in the per-expert layout, or fused where transformers saves
    the family's experts so (`saves_fused_experts`)."""
    fused = set()
    if family.saves_fused_experts:
        fused = {f"model.layers.{m[1]}.{family.moe_module}.{family.experts}.{m[2]}"
                 for m in map(_EXPERTS.fullmatch, expected) if m is not None}
    return tensor_plans(family, expected, moe_layers, fused)


def part_shape(plan: TensorPlan) -> tuple[int, ...]:
    """The shape of one foreign tensor of `plan`."""
    if not plan.per_expert:
        return plan.foreign_shape or plan.shape
    rows = plan.shape[1] // len(plan.sources[0])
    return (rows, *plan.shape[2:])


def check_against(plans: list[TensorPlan], family: MoeFamily, have: dict[str, tuple[int, ...]], where: str,
                  tied_head: bool, ignored=lambda name: False) -> None:
    """Refuse (naming the tensors) a checkpoint whose tensors `have` (name → shape) miss, add to or disagree with
    the plan: a partial load would leave weights randomly initialised."""
    wanted = {name: part_shape(plan) for plan in plans for name in plan.foreign_names}
    missing = sorted(name for name in wanted if name not in have)
    if missing:
        raise InteropError(f"{where}: this {family.model_type} checkpoint lacks {len(missing)} tensor(s) its config "
                           f"needs (first: {missing[:4]}); it is incomplete or of another config.")
    extra = sorted(name for name in have if name not in wanted and not name.endswith(_RECOMPUTED)
                   and not (tied_head and name == "lm_head.weight") and not ignored(name))
    if extra:
        raise InteropError(f"{where}: {len(extra)} tensor(s) of this {family.model_type} checkpoint have no place in "
                           f"hf-moe (first: {extra[:4]}); refusing rather than dropping weights.")
    wrong = [f"{name}: {list(have[name])} (expected {list(shape)})" for name, shape in wanted.items()
             if tuple(have[name]) != tuple(shape)]
    if wrong:
        raise InteropError(f"{where}: tensor shapes disagree with config.json: {wrong[:4]}.")


def export_sources(plans: list[TensorPlan]) -> list[tuple[str, tuple[int, ...], str, int | None, slice | None]]:
    """For every foreign tensor an export writes, in order: (foreign name, its shape, hf-moe name, expert or None,
    rows of that expert or None). Experts are written per expert, or whole where the plan reads them fused."""
    out = []
    for plan in plans:
        if not plan.per_expert:
            out.append((plan.sources[0][0], part_shape(plan), plan.name, None, None))
            continue
        rows = plan.shape[1] // len(plan.sources[0])
        for e, parts in enumerate(plan.sources):
            out += [(name, part_shape(plan), plan.name, e, slice(j * rows, (j + 1) * rows))
                    for j, name in enumerate(parts)]
    return out
