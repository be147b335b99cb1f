"""The vocabulary of an upcycling run: its settings, its result and verification, its error, and the values each
setting accepts.

This module sits below every other one in `conversions` and imports neither torch nor transformers, so the
command line can print its help without loading them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hf_moe import HfMoeConfig

# Output dtypes by name: each maps to the name of a torch dtype, or None for the source's.
DTYPE_NAMES: dict[str, str | None] = {"auto": None, "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                                      "float16": "float16", "fp32": "float32", "float32": "float32"}
ROUTER_INITS = ("normal", "zeros", "kmeans")
SUPPORTED_TEXT = ("llama (LlamaForCausalLM), mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM), "
                  "qwen3 (Qwen3ForCausalLM)")
FUNCTION_PRESERVING_TOLERANCE = 1e-5
CONVERT_TARGETS = ("hf_moe", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "deepseek_v3", "dots1",
                   "solar_open", "glm4_moe_lite", "minimax_m2", "deepseek_v2", "ernie4_5_moe", "hunyuan_v1_moe",
                   "hy_v3", "mistral4", "deepseek_v32", "glm_moe_dsa", "granitemoe", "granitemoeshared", "flex_olmo",
                   "auto")
"""`hf-moe convert --to` choices (named here so `--help` needs no torch; `conversions.converting.TARGETS` adds families
registered at run time)."""


class UpcycleError(ValueError):
    """The requested conversion is invalid; nothing was written."""


@dataclass
class UpcycleConfig:
    """What to build from the dense model. The CLI flags carry the same names (`--num-experts` → `num_experts`).

    Args:
        num_experts: routed experts per MoE layer (E).
        top_k: experts per token (k); a multiple of `granularity`.
        moe_layers: `"all"`, `"every-other"` (layers 0, 2, 4, ...) or explicit indices (`[0, 2, 5]` or `"0,2,5"`);
            the other layers keep their dense MLP.
        granularity: G, fine-grained experts of width I/G (He et al. 2024); E and k must be multiples of G.
        shared_experts: N shared experts of width I/G every token passes through (a multiple of G; they are
            N/G copies of the dense MLP). Shared and routed halves are each scaled by ½ to preserve function.
        shared_expert_gate: add a sigmoid gate on the shared experts, zero-initialised so σ(0) = ½ does the
            shared half's scaling.
        init: `"copy"` (Sparse Upcycling), `"noise:STD"` (add N(0, STD²) to every routed expert weight) or
            `"drop:R"` (Drop-Upcycling: re-initialise fraction R of each expert's intermediate neurons).
        router_init: `"normal"` (N(0, initializer_range²)), `"zeros"` (uniform routing) or `"kmeans"`
            (k-means centroids of the dense model's MLP inputs over `calibration_file`).
        calibration_file: UTF-8 text for `router_init="kmeans"`, tokenised with the source's tokenizer.
        calibration_tokens: at most this many calibration tokens, cut into sequences of `calibration_seq_len`.
        calibration_seq_len: length of each calibration sequence (the text's tail that does not fill one is
            dropped).
        dtype: `"auto"` (the source's) or `"bf16"`, `"fp16"`, `"fp32"`.
        max_shard_size: largest shard, e.g. `"5GB"` (decimal) or `"4GiB"`, or bytes.
        verify: compare dense and upcycled models on random tokens after writing (see `verify_upcycle`);
            for function-preserving settings a relative logit difference above 1e-5 aborts the conversion.
        overwrite: replace a non-empty output folder (only once the new one is complete).
        seed: seeds every random choice (router rows, noise, dropped neurons, k-means).
        base_model: hub id recorded in the model card (default: the source folder's name).
        progress: show tqdm progress bars.
    """

    num_experts: int = 8
    top_k: int = 2
    moe_layers: str | Sequence[int] = "all"
    granularity: int = 1
    shared_experts: int = 0
    shared_expert_gate: bool = False
    init: str = "copy"
    router_init: str = "normal"
    calibration_file: str | os.PathLike | None = None
    calibration_tokens: int = 8192
    calibration_seq_len: int = 512
    dtype: str = "auto"
    max_shard_size: int | str = "5GB"
    verify: bool = False
    overwrite: bool = False
    seed: int = 0
    base_model: str | None = None
    progress: bool = True


@dataclass
class UpcycleResult:
    """What was written: the folder, its config, parameter counts, and the verification if one ran."""

    output: Path
    config: HfMoeConfig
    total_parameters: int
    active_parameters: int
    num_shards: int
    function_preserving: bool
    change_reason: str
    verification: VerifyResult | None = None
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        cfg = self.config
        shards = f"{self.num_shards} shard{'s' if self.num_shards > 1 else ''}"
        lines = [
            f"wrote {self.output} ({shards}): {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, MoE layers "
            + str(cfg.moe_layer_indices),
            f"  parameters: {self.total_parameters:,} total, {self.active_parameters:,} active per token",
            f"  copied unchanged: {', '.join(self.copied_files) or 'nothing'}",
        ]
        if self.skipped_files:
            lines.append(f"  not copied: {', '.join(self.skipped_files)}")
        if self.verification is not None:
            lines.append(self.verification.summary())
        elif not self.function_preserving:
            lines.append(f"  note: the function changes by design ({self.change_reason}).")
        return "\n".join(lines)


@dataclass
class VerifyResult:
    """Max abs / rel difference of the logits (and of the hidden states after each layer)."""

    max_abs: float
    max_rel: float
    layer_rel: list[float]
    num_tokens: int
    expect_equal: bool
    reason: str = ""
    tolerance: float = FUNCTION_PRESERVING_TOLERANCE
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """For function-preserving settings: logits agree within the tolerance. Otherwise always True."""
        return not self.expect_equal or self.max_rel <= self.tolerance

    def summary(self) -> str:
        head = (f"verify: {self.num_tokens} random tokens, float32, layer by layer: "
                f"max |Δ logits| = {self.max_abs:.3e}, max rel = {self.max_rel:.3e}")
        layers = ", ".join(f"{r:.1e}" for r in self.layer_rel)
        lines = [head, f"  rel. difference of hidden states after each layer: [{layers}]"]
        if self.expect_equal:
            verdict = "PASS" if self.passed else "FAIL"
            lines.append(f"  {verdict}: this configuration preserves the dense model's function "
                         f"(required rel ≤ {self.tolerance:.0e}).")
        else:
            lines.append(f"  the function changes by design ({self.reason}); the numbers above are the measured "
                         f"deviation, not an error.")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
