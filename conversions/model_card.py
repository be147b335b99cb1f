"""The README.md model card of an upcycled checkpoint, rendered from `model_cards/upcycled.md`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from hf_moe.checkpoint_files import CheckpointError

from .init_methods import InitMethod

if TYPE_CHECKING:
    from .convert_types import ConvertResult
    from .sources import DenseSource
    from .upcycle_types import UpcycleConfig, UpcycleResult


def _templates_folder() -> Path:
    """An installed wheel holds the templates as package data (`conversions/model_cards/`, mapped in setup.py);
    a source checkout or an editable install reads them from the top-level `model_cards/` folder beside the package."""
    package = Path(__file__).resolve().parent
    installed = package / "model_cards"
    return installed if installed.is_dir() else package.parent / "model_cards"


TEMPLATE_PATH = _templates_folder() / "upcycled.md"
CONVERTED_TEMPLATE_PATH = _templates_folder() / "converted.md"

INIT_DESCRIPTIONS = {
    "copy": "`copy` — every routed expert is an exact copy of (its slice of) the dense MLP: Sparse Upcycling, "
            "Komatsuzaki et al. 2023, [arXiv:2212.05055](https://arxiv.org/abs/2212.05055). Preserves function.",
    "noise": "`noise:{value:g}` — copies of the dense MLP plus independent Gaussian noise N(0, {value:g}²) on every "
             "routed expert weight, so experts start apart. Changes the function.",
    "drop": "`drop:{value:g}` — Drop-Upcycling, Nakamura et al. 2025, "
            "[arXiv:2502.19261](https://arxiv.org/abs/2502.19261): in each expert a random {value:.0%} of the "
            "intermediate neurons (their gate/up rows and down_proj columns) are re-initialised from a normal "
            "distribution with the mean and std of the weights they replace. Changes the function when the "
            "fraction is > 0.",
}
ROUTER_DESCRIPTIONS = {
    "normal": "rows drawn from N(0, initializer_range²), one per virtual group.",
    "zeros": "all zeros (uniform routing at the start of training).",
    "kmeans": "k-means (cosine) centroids of the dense model's MLP inputs at each MoE layer over a calibration "
              "text, scaled to the norm of a N(0, initializer_range²) row.",
}


def _command(source: DenseSource, config: UpcycleConfig, output: Path) -> str:
    args = ["hf-moe", "upcycle", str(source.path), str(output), "--num-experts", str(config.num_experts),
            "--top-k", str(config.top_k)]
    layers = config.moe_layers if isinstance(config.moe_layers, str) else ",".join(map(str, config.moe_layers))
    args += ["--moe-layers", layers, "--granularity", str(config.granularity), "--shared-experts",
             str(config.shared_experts), "--init", str(config.init), "--router-init", config.router_init]
    if config.shared_expert_gate:
        args.append("--shared-expert-gate")
    if config.calibration_file is not None:
        args += ["--calibration-file", str(config.calibration_file)]
    args += ["--dtype", str(config.dtype), "--seed", str(config.seed)]
    return shlex.join(args)


def _hub_url(base_model: str) -> str | None:
    return f"https://huggingface.co/{base_model}" if re.fullmatch(r"[\w.-]+/[\w.-]+", base_model) else None


def source_card_fields(source: Path) -> dict[str, Any]:
    """The license and languages of the source folder's README.md, which the upcycled card keeps.

    Raises `CheckpointError` naming the file if its YAML front matter does not parse; call it before writing.
    """
    existing = Path(source) / "README.md"
    if not existing.is_file():
        return {}
    try:
        data = ModelCard.load(existing).data
    except (yaml.YAMLError, ValueError) as err:
        raise CheckpointError(f"{existing} has YAML front matter (between the '---' lines at its top) that does not "
                              f"parse as a metadata mapping ({err}); fix or remove it.") from err
    return {k: getattr(data, k) for k in ("license", "language") if getattr(data, k, None)}


def render_model_card(source: DenseSource, config: UpcycleConfig, init: InitMethod, result: UpcycleResult,
                      inherited: dict[str, Any]) -> ModelCard:
    """Fill the template: hub metadata (base_model, library, tags, and `inherited` from `source_card_fields`),
    parameters, conversion and verification."""
    base_model = config.base_model or source.path.resolve().name
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["moe", "upcycled", "hf-moe", source.model_type],
        **inherited,
    )
    cfg = result.config
    conversion = [
        ("source architecture", source.model_type),
        ("num_experts", cfg.num_experts),
        ("top_k", cfg.num_experts_per_tok),
        ("moe_layers", cfg.moe_layer_indices),
        ("granularity", config.granularity),
        ("expert width (moe_intermediate_size)", cfg.moe_intermediate_size),
        ("shared_experts", config.shared_experts),
        ("shared_expert_gate", config.shared_expert_gate),
        ("init", str(init)),
        ("router_init", config.router_init),
        ("dtype", str(cfg.dtype).replace("torch.", "")),
        ("seed", config.seed),
    ]
    if result.verification is not None:
        verification = "```\n" + result.verification.summary() + "\n```"
    else:
        verification = "Not run at conversion time (`hf-moe upcycle ... --verify` compares dense and MoE logits)."
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=result.output.name,
        model_path=str(result.output),
        source_type=source.model_type,
        base_model_url=_hub_url(base_model),
        num_experts=cfg.num_experts,
        moe_layers=cfg.moe_layer_indices,
        top_k=cfg.num_experts_per_tok,
        shared_experts=config.shared_experts,
        shared_expert_gate=config.shared_expert_gate,
        granularity=config.granularity,
        expert_width=cfg.moe_intermediate_size,
        function_preserving=result.function_preserving,
        change_reason=result.change_reason,
        total_parameters=f"{result.total_parameters:,}",
        active_parameters=f"{result.active_parameters:,}",
        conversion=conversion,
        init_description=INIT_DESCRIPTIONS[init.kind].format(value=init.value),
        router_description=ROUTER_DESCRIPTIONS[config.router_init],
        command=_command(source, config, result.output),
        verification=verification,
    )


def render_conversion_card(result: ConvertResult, source: Path, base_model: str | None,
                           inherited: dict[str, Any]) -> ModelCard:
    """The card of a `convert` output: hub metadata (base_model, library, tags, and `inherited` from
    `source_card_fields`), the layout written, parameters and the command."""
    base_model = base_model or Path(source).resolve().name
    tags = ["moe", "hf-moe", result.target_type] + ([result.source_type] if result.source_type != "hf_moe" else [])
    card_data = ModelCardData(base_model=base_model, library_name="transformers", pipeline_tag="text-generation",
                              tags=sorted(set(tags)), **inherited)
    cfg = result.config
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    moe_layers = cfg.moe_layer_indices if hasattr(cfg, "moe_layer_indices") else "see config.json"
    command = shlex.join(["hf-moe", "convert", str(source), str(result.output), "--to", result.target_type])
    return ModelCard.from_template(
        card_data,
        template_path=str(CONVERTED_TEMPLATE_PATH),
        model_name=result.output.name,
        model_path=str(result.output),
        source_type=result.source_type,
        target_type=result.target_type,
        architectures=", ".join(cfg.architectures or []),
        base_model=base_model,
        base_model_url=_hub_url(base_model),
        cast_to=result.cast_to,
        total_parameters=f"{result.total_parameters:,}",
        num_experts=num_experts,
        top_k=cfg.num_experts_per_tok,
        moe_layers=moe_layers,
        copied=", ".join(result.copied_files),
        command=command,
    )
