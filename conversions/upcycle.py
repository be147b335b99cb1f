"""Dense → MoE upcycling: turn the MLPs of a Llama / Mistral / Qwen2 / Qwen3 checkpoint into mixtures of experts.

Init methods, and whether the upcycled model computes exactly the dense model's function (with `norm_topk_prob`):

- `copy` (Sparse Upcycling, Komatsuzaki et al., 2023): every expert is a copy of the dense MLP. Preserves it.
- `noise:STD`: copy plus independent Gaussian noise N(0, STD²) on every expert weight. Changes it by design.
- `drop:R` (Drop-Upcycling, Nakamura et al., 2025): in each expert a random fraction R of the intermediate neurons
  is re-initialised from N(mean, std²) of the dense weight it replaces. Changes it for R > 0.
- `granularity=G` (fine-grained virtual groups, He et al., 2024; Megatron-Core): the dense MLP is split into G
  slices of width I/G, expert e is slice e mod G, router rows are tied within each group of G experts,
  `down_proj` is scaled by G (SiLU is not homogeneous, so the factor goes on `down_proj` only) and top-k must be
  a multiple of G. Preserves it.
- `shared_experts=N`: N copies of the dense MLP as shared experts; shared and routed halves are each scaled by ½
  (with `shared_expert_gate`, a zero-initialised gate gives σ(0) = ½ and only the routed `down_proj` is halved).
  Preserves it.

Routers start from `normal` (N(0, initializer_range²)), `zeros`, or `kmeans` (spherical k-means centroids of the dense
model's MLP inputs at that layer over a calibration text; the dense model runs one layer at a time, so memory is one
layer's weights plus `calibration_tokens × hidden_size` floats per MoE layer). Any router preserves function with
`copy`, because identical experts whose weights sum to one give back the dense MLP.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from hf_moe import HfMoeConfig, HfMoeForCausalLM

from .card import write_model_card
from .layerwise import LayerwiseModel
from .source import COPIED_FILES, Source, SourceError, _tensor_names, dense_config_kwargs, open_source
from .writer import ShardWriter, parse_size

_DTYPES = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class UpcycleConfig:
    """What to build. See the module docstring for what each init method does.

    Args:
        num_experts: routed experts per MoE layer (with `granularity` G: E fine-grained experts of width I/G).
        top_k: experts per token.
        moe_layers: "all", "every-other" (layers 1, 3, 5, ...) or explicit layer indices.
        granularity: G, number of slices the dense MLP is split into (1 = whole-MLP experts).
        shared_experts: copies of the dense MLP every token passes through.
        shared_expert_gate: give the shared experts a sigmoid gate (zero-initialised).
        init: "copy", "noise:STD" or "drop:R".
        router_init: "normal", "zeros" or "kmeans" (needs `calibration_file`).
        calibration_file: text for k-means router init (tokenised with the source's tokenizer).
        calibration_tokens: how many tokens of it to use.
        norm_topk_prob: renormalise the k routing weights to sum to one (needed to preserve function).
        dtype: "auto" (keep the source's), "bf16", "fp16" or "fp32".
        max_shard_size: largest safetensors shard, e.g. "5GB".
        verify: compare dense and MoE logits on random tokens after converting.
        overwrite: replace a non-empty output folder.
        seed: seed of every random choice (noise, dropped neurons, router init, k-means).
    """

    num_experts: int = 8
    top_k: int = 2
    moe_layers: str | list[int] = "all"
    granularity: int = 1
    shared_experts: int = 0
    shared_expert_gate: bool = False
    init: str = "copy"
    router_init: str = "normal"
    calibration_file: str | None = None
    calibration_tokens: int = 4096
    norm_topk_prob: bool = True
    dtype: str = "auto"
    max_shard_size: str | int = "5GB"
    verify: bool = False
    overwrite: bool = False
    seed: int = 0
    router_aux_loss_coef: float = 0.001
    base_model: str | None = None
    init_method: str = field(init=False, default="copy")
    init_value: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        def fail(name: str, value, expected: str) -> None:
            raise ValueError(f"UpcycleConfig.{name}={value!r} is invalid: expected {expected}.")

        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            fail("num_experts", self.num_experts, "a positive integer")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            fail("top_k", self.top_k, f"an integer in [1, num_experts={self.num_experts}]")
        if not isinstance(self.granularity, int) or self.granularity < 1:
            fail("granularity", self.granularity, "a positive integer")
        if self.num_experts % self.granularity:
            fail("granularity", self.granularity, f"a divisor of num_experts={self.num_experts} (experts come in "
                 "virtual groups of G slices)")
        if self.top_k % self.granularity:
            fail("top_k", self.top_k, f"a multiple of granularity={self.granularity}, so that whole virtual groups "
                 "are selected and the dense function is preserved")
        if not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            fail("shared_experts", self.shared_experts, "an integer >= 0")
        if self.shared_expert_gate and not self.shared_experts:
            fail("shared_expert_gate", True, "False when shared_experts=0")
        method, _, value = self.init.partition(":")
        try:
            number = float(value) if value else 0.0
        except ValueError:
            number = -1.0
        if method == "copy" and not value:
            pass
        elif method == "noise" and value and number > 0:
            pass
        elif method == "drop" and value and 0.0 <= number <= 1.0:
            pass
        else:
            fail("init", self.init, "'copy', 'noise:STD' with STD > 0, or 'drop:R' with R in [0, 1]")
        self.init_method, self.init_value = method, number
        if self.router_init not in ("normal", "zeros", "kmeans"):
            fail("router_init", self.router_init, "'normal', 'zeros' or 'kmeans'")
        if self.router_init == "kmeans" and not self.calibration_file:
            fail("calibration_file", self.calibration_file, "a text file when router_init='kmeans'")
        if self.calibration_file and not os.path.isfile(self.calibration_file):
            fail("calibration_file", self.calibration_file, "an existing text file")
        if self.dtype not in _DTYPES:
            fail("dtype", self.dtype, f"one of {', '.join(_DTYPES)}")
        parse_size(self.max_shard_size)
        if isinstance(self.moe_layers, str) and self.moe_layers not in ("all", "every-other"):
            fail("moe_layers", self.moe_layers, "'all', 'every-other' or a list of layer indices")

    @property
    def preserves_function(self) -> bool:
        """Whether the upcycled model computes exactly the dense model's function (DESIGN.md §3)."""
        exact_experts = self.init_method == "copy" or (self.init_method == "drop" and self.init_value == 0.0)
        return exact_experts and self.norm_topk_prob

    def layer_indices(self, num_layers: int) -> list[int]:
        if self.moe_layers == "all":
            return list(range(num_layers))
        if self.moe_layers == "every-other":
            return list(range(1, num_layers, 2))
        bad = [i for i in self.moe_layers if not 0 <= i < num_layers]
        if bad or len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError(f"UpcycleConfig.moe_layers={self.moe_layers} is invalid: expected distinct layer "
                             f"indices in [0, {num_layers}).")
        return sorted(self.moe_layers)


@dataclass
class UpcycleReport:
    """What a conversion produced."""

    output_dir: str
    total_params: int
    active_params: int
    moe_layers: list[int]
    files: list[str]
    preserves_function: bool
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        text = (f"{self.output_dir}: {self.total_params / 1e6:.1f}M parameters ({self.active_params / 1e6:.1f}M active "
                f"per token), MoE layers {self.moe_layers}, {len(self.files)} weight file(s), {self.seconds:.1f} s")
        if self.max_abs_diff is not None:
            text += f"; verify: max |Δlogit| = {self.max_abs_diff:.2e} (relative {self.max_rel_diff:.2e})"
        return text


def moe_config(source_config, cfg: UpcycleConfig) -> HfMoeConfig:
    """The HfMoeConfig of the upcycled model: the dense architecture exactly, plus the MoE fields."""
    dense = dense_config_kwargs(source_config)
    if dense["intermediate_size"] % cfg.granularity:
        raise ValueError(f"UpcycleConfig.granularity={cfg.granularity} is invalid: expected a divisor of the dense "
                         f"intermediate_size={dense['intermediate_size']}.")
    dtype = _DTYPES[cfg.dtype] or getattr(source_config, "dtype", None) or torch.float32
    return HfMoeConfig(
        **dense,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.norm_topk_prob,
        moe_intermediate_size=dense["intermediate_size"] // cfg.granularity,
        moe_layers=cfg.layer_indices(dense["num_hidden_layers"]),
        num_shared_experts=cfg.shared_experts,
        shared_expert_intermediate_size=cfg.shared_experts * dense["intermediate_size"] or None,
        shared_expert_gate=cfg.shared_expert_gate,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        architectures=["HfMoeForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )


def _reinit_like(weight: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * weight.std() + weight.mean()


def build_experts(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, cfg: UpcycleConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked `gate_up_proj [E, 2i, H]` and `down_proj [E, H, i]` (fp32) from one dense MLP."""
    intermediate = gate.shape[0]
    width = intermediate // cfg.granularity
    routed_scale = cfg.granularity * (0.5 if cfg.shared_experts else 1.0)
    gate_up, downs = [], []
    for expert in range(cfg.num_experts):
        piece = slice((expert % cfg.granularity) * width, (expert % cfg.granularity + 1) * width)
        g, u, d = gate[piece].clone(), up[piece].clone(), down[:, piece] * routed_scale
        if cfg.init_method == "noise":
            g += torch.randn(g.shape, generator=generator) * cfg.init_value
            u += torch.randn(u.shape, generator=generator) * cfg.init_value
            d += torch.randn(d.shape, generator=generator) * cfg.init_value
        elif cfg.init_method == "drop" and cfg.init_value > 0:
            neurons = torch.randperm(width, generator=generator)[: round(cfg.init_value * width)]
            g[neurons] = _reinit_like(gate, (len(neurons), g.shape[1]), generator)
            u[neurons] = _reinit_like(up, (len(neurons), u.shape[1]), generator)
            d[:, neurons] = _reinit_like(down, (d.shape[0], len(neurons)), generator) * routed_scale
        gate_up.append(torch.cat([g, u], dim=0))
        downs.append(d)
    return torch.stack(gate_up), torch.stack(downs)


def router_weight(cfg: UpcycleConfig, hidden_size: int, std: float, generator: torch.Generator,
                  calibration: torch.Tensor | None) -> torch.Tensor:
    """`[E, H]` router; rows are tied within each virtual group of `granularity` experts."""
    groups = cfg.num_experts // cfg.granularity
    if cfg.router_init == "zeros":
        rows = torch.zeros(groups, hidden_size)
    elif cfg.router_init == "normal":
        rows = torch.randn(groups, hidden_size, generator=generator) * std
    else:
        rows = spherical_kmeans(calibration, groups, generator)
    return rows.repeat_interleave(cfg.granularity, dim=0)


def spherical_kmeans(points: torch.Tensor, k: int, generator: torch.Generator, steps: int = 25) -> torch.Tensor:
    """`k` unit-norm centroids of the directions of `points [N, H]` (cosine k-means, k-means++ start)."""
    x = torch.nn.functional.normalize(points.float(), dim=-1)
    if x.shape[0] < k:
        raise ValueError(f"k-means router init needs at least num_experts/granularity={k} calibration tokens, "
                         f"got {x.shape[0]}; use a longer calibration_file.")
    centroids = x[torch.randint(x.shape[0], (1,), generator=generator)]
    while centroids.shape[0] < k:
        distance = (1 - x @ centroids.T).min(dim=1).values.clamp(min=0)
        pick = torch.multinomial(distance + 1e-12, 1, generator=generator)
        centroids = torch.cat([centroids, x[pick]])
    for _ in range(steps):
        assignment = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        empty = sums.norm(dim=1) == 0
        sums[empty] = centroids[empty]
        centroids = torch.nn.functional.normalize(sums, dim=-1)
    return centroids


def calibration_inputs(source: Source, cfg: UpcycleConfig, layers: list[int]) -> dict[int, torch.Tensor]:
    """MLP inputs of the dense model at each MoE layer over the calibration text, run one layer at a time."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except Exception as e:
        raise SourceError(f"{source.path}: k-means router init needs the source's tokenizer ({e}).") from e
    with open(cfg.calibration_file, encoding="utf-8") as f:
        ids = tokenizer(f.read())["input_ids"][: cfg.calibration_tokens]
    block = min(len(ids), source.config.max_position_embeddings, 512)
    batch = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    dense = LayerwiseModel(source.config, _dense_class(source.config), source.get)
    collected: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def keep(layer: int, x: torch.Tensor) -> None:
        if layer in collected:
            collected[layer].append(x.reshape(-1, x.shape[-1]))

    for row in batch.split(8):
        dense.logits(row, on_mlp_input=keep)
    return {i: torch.cat(xs) for i, xs in collected.items()}


def _dense_class(config) -> type:
    """The transformers causal-LM class of a dense source config (LlamaForCausalLM, ...)."""
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def count_parameters(config: HfMoeConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts of an hf-moe model with this config."""
    with torch.device("meta"):
        model = HfMoeForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for i in config.moe_layer_indices:
        experts = model.model.layers[i].mlp.experts
        per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // config.num_experts
        inactive += per_expert * (config.num_experts - config.num_experts_per_tok)
    return total, total - inactive


def upcycle(source_dir: str, output_dir: str, cfg: UpcycleConfig | None = None) -> UpcycleReport:
    """Convert the dense checkpoint in `source_dir` into an hf-moe checkpoint in `output_dir`.

    Streams: one source tensor and one layer's expert stack at a time, shards written as they fill. The output is
    built in a temporary sibling folder and moved into place only when complete (verification included), so an
    error or Ctrl-C leaves neither a partial `output_dir` nor the temporary folder behind.
    """
    cfg = cfg or UpcycleConfig()
    start = time.time()
    source = open_source(source_dir)
    config = moe_config(source.config, cfg)
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"{output_dir} exists and is not a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not cfg.overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    calibration = calibration_inputs(source, cfg, config.moe_layer_indices) if cfg.router_init == "kmeans" else {}

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        files = _write(source, config, cfg, tmp, calibration)
        total, active = count_parameters(config)
        report = UpcycleReport(output_dir=output_dir, total_params=total, active_params=active,
                               moe_layers=config.moe_layer_indices, files=files,
                               preserves_function=cfg.preserves_function)
        if cfg.verify:
            report.max_abs_diff, report.max_rel_diff = verify(source_dir, tmp, seed=cfg.seed)
        report.seconds = time.time() - start
        write_model_card(tmp, source, config, cfg, report)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write(source: Source, config: HfMoeConfig, cfg: UpcycleConfig, folder: str,
           calibration: dict[int, torch.Tensor]) -> list[str]:
    dtype = getattr(torch, config.dtype) if isinstance(config.dtype, str) else config.dtype
    names = [n for n in source.tensor_files if not n.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings:
        names = [n for n in names if n != "lm_head.weight"]
    moe_layers = set(config.moe_layer_indices)
    bar = tqdm(total=len(names), desc="upcycling", unit="tensor")
    writer = ShardWriter(folder, parse_size(cfg.max_shard_size))
    mlp_names = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
    for name in names:
        if not any(name.endswith(m) for m in mlp_names) or _layer_of(name) not in moe_layers:
            writer.add(name, source.get(name).to(dtype))
            bar.update()
    for layer in sorted(moe_layers):
        prefix = f"model.layers.{layer}.mlp."
        gate, up, down = (source.get(prefix + m).float() for m in ("gate_proj.weight", "up_proj.weight",
                                                                   "down_proj.weight"))
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + layer)
        gate_up, down_stack = build_experts(gate, up, down, cfg, generator)
        writer.add(prefix + "experts.gate_up_proj", gate_up.to(dtype))
        writer.add(prefix + "experts.down_proj", down_stack.to(dtype))
        router = router_weight(cfg, config.hidden_size, config.initializer_range, generator, calibration.get(layer))
        writer.add(prefix + "router.weight", router.to(dtype))
        if cfg.shared_experts:
            shared_down_scale = 1.0 if cfg.shared_expert_gate else 0.5
            writer.add(prefix + "shared_experts.gate_proj.weight", gate.repeat(cfg.shared_experts, 1).to(dtype))
            writer.add(prefix + "shared_experts.up_proj.weight", up.repeat(cfg.shared_experts, 1).to(dtype))
            shared_down = down.repeat(1, cfg.shared_experts) * shared_down_scale / cfg.shared_experts
            writer.add(prefix + "shared_experts.down_proj.weight", shared_down.to(dtype))
            if cfg.shared_expert_gate:
                writer.add(prefix + "shared_expert_gate.weight", torch.zeros(1, config.hidden_size, dtype=dtype))
        bar.update(3)
        del gate_up, down_stack
    files = writer.finish()
    bar.close()
    config.save_pretrained(folder)
    for file in COPIED_FILES:
        if os.path.isfile(os.path.join(source.path, file)):
            shutil.copy2(os.path.join(source.path, file), os.path.join(folder, file))
    return files


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


@torch.no_grad()
def verify(source_dir: str, moe_dir: str, seed: int = 0, batch: int = 2, length: int = 32) -> tuple[float, float]:
    """Max |Δlogit| and max |Δlogit| / max |logit| between the dense source and the MoE on random tokens (fp32).

    Both models run one layer at a time, so this fits in the memory of one layer of each.
    """
    source = open_source(source_dir)
    moe = open_source_moe(moe_dir)
    generator = torch.Generator().manual_seed(seed)
    length = min(length, source.config.max_position_embeddings)
    ids = torch.randint(0, source.config.vocab_size, (batch, length), generator=generator)
    dense_model = LayerwiseModel(source.config, _dense_class(source.config),
                                 source.get)
    dense_logits = dense_model.logits(ids)
    moe_logits = LayerwiseModel(moe.config, HfMoeForCausalLM, moe.get).logits(ids)
    diff = (moe_logits - dense_logits).abs().max().item()
    return diff, diff / dense_logits.abs().max().item()


def open_source_moe(path: str) -> Source:
    """Index the tensors of an hf-moe checkpoint (for verification)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = {n: os.path.join(path, v) for n, v in json.load(f)["weight_map"].items()}
    else:
        single = os.path.join(path, "model.safetensors")
        files = {n: single for n in _tensor_names(single)}
    return Source(path=path, config=HfMoeConfig.from_pretrained(path), tensor_files=files)


__all__ = ["UpcycleConfig", "UpcycleReport", "upcycle", "verify"]
