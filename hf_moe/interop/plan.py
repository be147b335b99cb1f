"""Where each hf-moe tensor's values are in a foreign checkpoint, and each foreign tensor's in an hf-moe one.

A plan is built from the names and shapes an hf-moe model expects (its meta-device state dict) and a family's names,
so the same plan drives a direct load, an expert-parallel load (each rank reads its experts' rows only) and a
streaming conversion either way.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .family import InteropError, MoeFamily

_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_RECOMPUTED = (".rotary_emb.inv_freq",)  # buffers older checkpoints carry; the model recomputes them
ExportBlock = tuple[str, int | None, slice | None]
"""Rows of a foreign tensor an export writes: (hf-moe name, expert or None, rows of that expert or None)."""


@dataclass(frozen=True)
class TensorPlan:
    """One hf-moe tensor and the foreign tensors that hold its values.

    `sources[e]` are the foreign tensors of expert `e` concatenated along their dim 0 (`per_expert`: gate then up
    for `gate_up_proj`, down for `down_proj`); otherwise `sources == ((name,),)`, one foreign tensor of the same
    shape (the routed experts' fused tensor when `experts`, read by expert rows), or of `foreign_shape` when set:
    the same values in another shape (ERNIE-4.5's `[1, E]` expert bias), or with `rows = (a, b)` those rows of it
    (Granite's shared MLP holds the gate's rows, then the up projection's)."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[tuple[str, ...], ...]
    experts: bool = False
    per_expert: bool = False
    foreign_shape: tuple[int, ...] | None = None
    rows: tuple[int, int] | None = None

    @property
    def foreign_names(self) -> list[str]:
        return [name for parts in self.sources for name in parts]


def tensor_plans(family: MoeFamily, expected: dict[str, tuple[int, ...]], moe_layers: Iterable[int],
                 stored: Collection[str] | None = None) -> list[TensorPlan]:
    """The plan of every hf-moe tensor in `expected` (name → full shape). Routed experts are read fused where the
    checkpoint's tensor names `stored` (an import) include the family's fused names (`MoeFamily.fused_names`), else
    from the per-expert layout transformers 5 saves; without `stored` (an export) they are planned as the family
    saves them: fused when it names `fused_experts`, else per expert."""
    moe = set(moe_layers)
    plans = []
    for name, shape in expected.items():
        match = _EXPERTS.fullmatch(name)
        if match is None:
            foreign, block, blocks = family.foreign_rows(name, moe)
            if blocks > 1:  # rows of a foreign tensor stacking several hf-moe tensors
                plans.append(TensorPlan(name, shape, ((foreign,),), foreign_shape=(blocks * shape[0], *shape[1:]),
                                        rows=(block * shape[0], (block + 1) * shape[0])))
                continue
            as_row = family.expert_bias_as_row and name.endswith(".router.expert_bias")
            plans.append(TensorPlan(name, shape, ((foreign,),), foreign_shape=(1, *shape) if as_row else None))
            continue
        layer, part = match.groups()
        fused = family.fused_names(int(layer))[part == "down_proj"]
        read_fused = family.fused_experts is not None if stored is None else fused in stored
        if read_fused:
            plans.append(TensorPlan(name, shape, ((fused,),), experts=True))
            continue
        prefix = f"model.layers.{layer}.{family.moe_module}.{family.experts}."
        names = family.expert_names
        projections = (names.gate, names.up) if part == "gate_up_proj" else (names.down,)
        sources = tuple(tuple(f"{prefix}{e}.{p}.weight" for p in projections) for e in range(shape[0]))
        plans.append(TensorPlan(name, shape, sources, experts=True, per_expert=True))
    return plans


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


def export_sources(plans: list[TensorPlan]) -> list[tuple[str, tuple[int, ...], list[ExportBlock]]]:
    """For every foreign tensor an export writes, in order: (foreign name, its shape, its blocks of rows in order).
    A block `(hf-moe name, expert, rows)` is that whole hf-moe tensor (`expert` None), one expert's `[1, ...]` slice
    of it (a fused expert tensor, one block per expert) or that expert's `rows` (the per-expert layout); a foreign
    tensor holding several hf-moe tensors' rows (`TensorPlan.rows`) has a block for each."""
    out: dict[str, tuple[tuple[int, ...], list[tuple[int, ExportBlock]]]] = {}
    for plan in plans:
        if not plan.experts:
            first_row = plan.rows[0] if plan.rows else 0
            out.setdefault(plan.sources[0][0], (part_shape(plan), []))[1].append((first_row, (plan.name, None, None)))
        elif not plan.per_expert:
            out[plan.sources[0][0]] = (plan.shape, [(e, (plan.name, e, None)) for e in range(plan.shape[0])])
        else:
            rows = plan.shape[1] // len(plan.sources[0])
            for e, parts in enumerate(plan.sources):
                for j, name in enumerate(parts):
                    out[name] = (part_shape(plan), [(0, (plan.name, e, slice(j * rows, (j + 1) * rows)))])
    return [(name, shape, [block for _, block in sorted(blocks, key=lambda b: b[0])])
            for name, (shape, blocks) in out.items()]
