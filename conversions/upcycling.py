"""Dense → MoE upcycling of Llama, Mistral, Qwen2 and Qwen3 checkpoints into hf-moe checkpoints.

    from conversions import UpcycleConfig, upcycle
    result = upcycle("./llama-dense", "./llama-8x", UpcycleConfig(num_experts=8, top_k=2, verify=True))

The conversion streams: it reads one source tensor at a time and writes each expert's rows straight into
the output shard, so peak memory is about one dense MLP, not the model. Output goes to a temporary folder that
is moved into place only when complete; an error, Ctrl-C or SIGTERM (from the CLI) leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_moe import HfMoeConfig

from .init_methods import (
    InitMethod,
    expert_down,
    expert_gate_up,
    router_from_centroids,
    router_normal,
    spherical_kmeans,
)
from .layerwise import LayerwiseModel
from .model_card import render_model_card, source_card_fields
from .output import atomic_output, check_output, copy_side_files
from .safetensors_io import (
    PlannedTensor,
    parse_size,
    plan_shards,
    whole,
    write_shards,
)
from .sources import DenseSource, expected_shapes
from .upcycle_types import DTYPE_NAMES, ROUTER_INITS, UpcycleConfig, UpcycleError, UpcycleResult
from .verification import verify_upcycle

DTYPES: dict[str, torch.dtype | None] = {name: dtype and getattr(torch, dtype) for name, dtype in DTYPE_NAMES.items()}
def parse_moe_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """`"all"`, `"every-other"` (0, 2, 4, ...), `"0,2,5"` or a sequence of ints → sorted layer indices."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        if spec == "every-other":
            return list(range(0, num_layers, 2))
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise UpcycleError(f"moe_layers={spec!r} is invalid: expected 'all', 'every-other' or comma-separated "
                               f"layer indices such as '0,2,5'.") from None
    layers = sorted({int(i) for i in spec})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if not layers or bad:
        raise UpcycleError(f"moe_layers={list(spec)!r} is invalid: expected at least one layer index in "
                           f"[0, {num_layers}) (the source has {num_layers} layers; bad: {bad}).")
    return layers


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


@dataclass
class UpcyclePlan:
    """The validated settings of one conversion."""

    config: UpcycleConfig
    init: InitMethod
    moe_layers: list[int]
    dtype: torch.dtype
    routed_scale: float
    shared_copies: int
    shared_scale: float

    @property
    def change_reason(self) -> str:
        """Why the upcycled model does not compute the dense function ('' if it does)."""
        if self.init.kind == "noise" and not self.init.preserves_function:
            return f"init={self.init} adds Gaussian noise to every routed expert"
        if self.init.kind == "drop" and not self.init.preserves_function:
            return f"init={self.init} re-initialises {self.init.value:.0%} of each expert's intermediate neurons"
        scales = [self.routed_scale] + ([self.shared_scale] if self.shared_copies else [])
        if self.dtype != torch.float32 and not all(_is_power_of_two(s) for s in scales):
            return (f"the down_proj scale factors {scales} are not powers of two, so storing them in {self.dtype} "
                    f"rounds the weights (exact in float32)")
        return ""


def plan_upcycle(cfg: UpcycleConfig, source: DenseSource) -> UpcyclePlan:
    """`cfg` checked against `source`: the settings of the conversion, or an `UpcycleError` naming the bad value."""

    def fail(name: str, value, expected: str) -> None:
        raise UpcycleError(f"{name}={value!r} is invalid: expected {expected}.")

    for name in ("num_experts", "top_k", "granularity", "calibration_tokens", "calibration_seq_len"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(name, value, "a positive integer")
    if isinstance(cfg.shared_experts, bool) or not isinstance(cfg.shared_experts, int) or cfg.shared_experts < 0:
        fail("shared_experts", cfg.shared_experts, "an integer >= 0")
    try:
        init = InitMethod.parse(cfg.init)
    except ValueError as err:
        raise UpcycleError(str(err)) from None
    if cfg.router_init not in ROUTER_INITS:
        fail("router_init", cfg.router_init, f"one of {', '.join(ROUTER_INITS)}")
    if str(cfg.dtype) not in DTYPES:
        fail("dtype", cfg.dtype, f"one of {', '.join(DTYPES)}")
    try:
        parse_size(cfg.max_shard_size)
    except ValueError as err:
        raise UpcycleError(str(err)) from None

    E, k, G, N = cfg.num_experts, cfg.top_k, cfg.granularity, cfg.shared_experts
    intermediate = source.hf_moe_fields["intermediate_size"]
    if k > E:
        fail("top_k", k, f"at most num_experts={E}")
    if E % G:
        fail("num_experts", E, f"a multiple of granularity={G} (each virtual group holds all G slices of the "
                               f"dense MLP)")
    if k % G:
        fail("top_k", k, f"a multiple of granularity={G}: with tied router rows top-k must select whole virtual "
                         f"groups, otherwise the upcycled layer computes only part of the dense MLP "
                         f"(e.g. top_k={G * max(1, k // G)})")
    if intermediate % G:
        fail("granularity", G, f"a divisor of the source's intermediate_size={intermediate}")
    if N % G:
        fail("shared_experts", N, f"a multiple of granularity={G} (shared experts of width I/G={intermediate // G} "
                                  f"are built from whole copies of the dense MLP)")
    if cfg.shared_expert_gate and N == 0:
        fail("shared_expert_gate", True, "False when shared_experts=0")
    if cfg.router_init == "zeros" and G > 1:
        fail("router_init", "zeros", "'normal' or 'kmeans' when granularity > 1: with all logits equal, top-k "
                                     "breaks ties arbitrarily and can split a virtual group")
    if cfg.router_init == "kmeans" and cfg.calibration_file is None:
        fail("calibration_file", None, "a text file when router_init='kmeans'")
    if cfg.router_init != "kmeans" and cfg.calibration_file is not None:
        fail("calibration_file", str(cfg.calibration_file), "None unless router_init='kmeans' (only k-means uses it)")
    if cfg.calibration_file is not None and not Path(cfg.calibration_file).is_file():
        fail("calibration_file", str(cfg.calibration_file), "an existing text file")
    moe_layers = parse_moe_layers(cfg.moe_layers, source.hf_moe_fields["num_hidden_layers"])
    shared_copies = N // G
    return UpcyclePlan(
        config=cfg,
        init=init,
        moe_layers=moe_layers,
        dtype=DTYPES[str(cfg.dtype)] or source.dtype,
        routed_scale=G * (0.5 if N else 1.0),
        shared_copies=shared_copies,
        shared_scale=(1.0 / shared_copies) * (1.0 if cfg.shared_expert_gate else 0.5) if N else 0.0,
    )


def upcycled_config(source: DenseSource, plan: UpcyclePlan) -> HfMoeConfig:
    """The MoE model's config: the source's fields with the plan's experts, router and shared experts."""
    cfg = plan.config
    intermediate = source.hf_moe_fields["intermediate_size"]
    config = HfMoeConfig(
        **source.hf_moe_fields,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=True,
        moe_intermediate_size=intermediate // cfg.granularity,
        moe_layers=plan.moe_layers,
        num_shared_experts=cfg.shared_experts,
        shared_expert_intermediate_size=cfg.shared_experts * intermediate // cfg.granularity or None,
        shared_expert_gate=cfg.shared_expert_gate,
    )
    config.architectures = ["HfMoeForCausalLM"]
    config.dtype = plan.dtype
    return config


def _kmeans_routers(source: DenseSource, plan: UpcyclePlan, progress: bool) -> dict[int, torch.Tensor]:
    """Router rows from k-means centroids of each MoE layer's MLP inputs, running the dense model layer by layer.

    Memory: one dense layer in float32, the embedding matrix in float32, T·H·16 bytes for T calibration tokens
    (hidden states, one layer's MLP inputs and their float64 copy for k-means), and the activations of four
    sequences at a time inside the layer.
    """
    from transformers import AutoTokenizer

    cfg = plan.config
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except Exception as err:
        raise UpcycleError(f"router_init='kmeans' tokenises {cfg.calibration_file} with the source's tokenizer, "
                           f"but {source.path} has none that loads ({err}).") from err
    text = Path(cfg.calibration_file).read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: cfg.calibration_tokens]
    groups = cfg.num_experts // cfg.granularity
    seq_len = min(cfg.calibration_seq_len, len(ids))
    if len(ids) < groups:
        raise UpcycleError(f"calibration_file={str(cfg.calibration_file)!r} gives {len(ids)} tokens; k-means needs at "
                           f"least one per virtual group ({groups}).")
    usable = len(ids) // seq_len * seq_len
    batch = torch.tensor(ids[:usable]).view(-1, seq_len)
    dense = LayerwiseModel(source.dense_config(), source.reader)
    std = source.hf_moe_fields["initializer_range"]
    routers: dict[int, torch.Tensor] = {}

    def cluster(layer: int, mlp_inputs: torch.Tensor) -> None:
        centroids = spherical_kmeans(mlp_inputs, groups, cfg.seed + layer)
        routers[layer] = router_from_centroids(centroids, cfg.granularity, std)

    with tqdm(total=max(plan.moe_layers) + 1, desc="k-means router init", disable=not progress) as bar:
        dense.run_layers(dense.embed(batch), stop=max(plan.moe_layers) + 1, collect=plan.moe_layers,
                         on_mlp_inputs=cluster, progress=lambda _: bar.update())
    return routers


def _planned_tensors(source: DenseSource, plan: UpcyclePlan, out_config: HfMoeConfig,
                     routers: dict[int, torch.Tensor]) -> list[PlannedTensor]:
    """Every output tensor in the order the model defines them, each with a producer reading the source lazily."""
    cfg, reader, dtype = plan.config, source.reader, plan.dtype
    E, G, H = cfg.num_experts, cfg.granularity, out_config.hidden_size
    std = out_config.initializer_range

    def copied(name: str):
        return whole(lambda: reader.get(name).to(dtype))

    def router(layer: int):
        if cfg.router_init == "zeros":
            return whole(lambda: torch.zeros(E, H, dtype=dtype))
        if cfg.router_init == "kmeans":
            return whole(lambda: routers[layer].to(dtype))
        return whole(lambda: router_normal(E, H, G, std, cfg.seed, layer).to(dtype))

    def gate_up(layer: int) -> Iterator[torch.Tensor]:
        prefix = f"model.layers.{layer}.mlp."
        gate, up = reader.get(prefix + "gate_proj.weight"), reader.get(prefix + "up_proj.weight")
        for e in range(E):
            yield expert_gate_up(gate, up, e, G, plan.init, cfg.seed, layer).to(dtype).unsqueeze(0)

    def down(layer: int) -> Iterator[torch.Tensor]:
        weight = reader.get(f"model.layers.{layer}.mlp.down_proj.weight")
        for e in range(E):
            yield expert_down(weight, e, G, plan.routed_scale, plan.init, cfg.seed, layer).to(dtype).unsqueeze(0)

    def shared_rows(name: str) -> Iterator[torch.Tensor]:
        weight = reader.get(name).to(dtype)
        for _ in range(plan.shared_copies):
            yield weight

    def shared_down(name: str) -> torch.Tensor:
        weight = reader.get(name).float() * plan.shared_scale
        return torch.cat([weight] * plan.shared_copies, dim=1).to(dtype)

    moe_name = re.compile(r"model\.layers\.(\d+)\.mlp\.(.+)")
    planned = []
    for name, shape in expected_shapes(out_config).items():
        match = moe_name.fullmatch(name)
        layer, part = (int(match.group(1)), match.group(2)) if match else (-1, "")
        if layer not in plan.moe_layers:
            produce = copied(name)
        elif part == "router.weight":
            produce = router(layer)
        elif part == "experts.gate_up_proj":
            produce = partial(gate_up, layer)
        elif part == "experts.down_proj":
            produce = partial(down, layer)
        elif part in ("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight"):
            dense_name = f"model.layers.{layer}.mlp.{part.split('.')[1]}.weight"
            produce = partial(shared_rows, dense_name)
        elif part == "shared_experts.down_proj.weight":
            produce = whole(lambda layer=layer: shared_down(f"model.layers.{layer}.mlp.down_proj.weight"))
        elif part == "shared_expert_gate.weight":
            produce = whole(lambda: torch.zeros(1, H, dtype=dtype))
        else:
            raise RuntimeError(f"internal error: no producer for {name}")
        planned.append(PlannedTensor(name, shape, dtype, produce))
    return planned


def upcycle(src: str | os.PathLike, out: str | os.PathLike, config: UpcycleConfig | None = None) -> UpcycleResult:
    """Upcycle the dense checkpoint folder `src` into an hf-moe checkpoint folder `out`.

    Validates everything before writing anything; writes into a temporary sibling of `out` and moves it into
    place only when complete (weights, config.json, tokenizer / chat template / generation config copied
    byte for byte, README.md model card). Returns what was written. Raises `UpcycleError` (a `ValueError`)
    for invalid settings, `UnsupportedSourceError` / `CheckpointError` for sources it cannot read exactly.
    """
    config = config or UpcycleConfig()
    src, out = Path(src), Path(out)
    source = DenseSource.open(src)
    plan = plan_upcycle(config, source)
    card_fields = source_card_fields(src)
    check_output(src, out, config.overwrite, UpcycleError)
    out_config = upcycled_config(source, plan)
    routers = _kmeans_routers(source, plan, config.progress) if config.router_init == "kmeans" else {}
    tensors = _planned_tensors(source, plan, out_config, routers)
    shards = plan_shards(tensors, parse_size(config.max_shard_size))

    total = sum(t.numel for t in tensors)
    routed = sum(t.numel for t in tensors if ".mlp.experts." in t.name)
    inactive = routed * (config.num_experts - config.top_k) // config.num_experts
    reason = plan.change_reason
    with atomic_output(out) as tmp:
        out_config.save_pretrained(tmp)
        with tqdm(total=len(tensors), unit="tensor", desc="upcycling", disable=not config.progress) as bar:
            def step(shard: str, t: PlannedTensor) -> None:
                bar.set_postfix_str(f"{shard}: {t.name}", refresh=False)
                bar.update()

            write_shards(tmp, shards, step)
        copied, skipped = copy_side_files(src, tmp)
        verification = None
        if config.verify:
            verification = verify_upcycle(source, tmp, expect_equal=not reason, reason=reason, seed=config.seed,
                                          progress=config.progress)
            if not verification.passed:
                raise UpcycleError(f"verification failed, nothing was written:\n{verification.summary()}")
        result = UpcycleResult(out, out_config, total, total - inactive, len(shards), not reason, reason,
                               verification, copied, skipped)
        render_model_card(source, config, plan.init, result, card_fields).save(tmp / "README.md")
    return result



__all__ = ["UpcycleConfig", "UpcycleError", "UpcycleResult", "parse_moe_layers", "upcycle"]
