"""The model card written next to a converted checkpoint, rendered from a template in `model_cards/`."""

from __future__ import annotations

import os
from dataclasses import fields
from importlib import resources

from huggingface_hub import ModelCard, ModelCardData


def _template() -> str:
    return resources.files("model_cards").joinpath("upcycled.md").read_text(encoding="utf-8")


def _verification(cfg, report) -> str:
    if report.max_abs_diff is None:
        return "Not verified (run the converter with `--verify`)."
    measured = (f"Dense and MoE logits on random tokens (fp32): max |Δ| = {report.max_abs_diff:.3e}, "
                f"relative {report.max_rel_diff:.3e}.")
    if cfg.preserves_function:
        return measured + " These settings preserve the dense model's function."
    return measured + " These settings change the function by design (noise, re-initialisation or no renormalisation)."


def write_model_card(folder: str, source, config, cfg, report) -> None:
    """Render `model_cards/upcycled.md` into `folder/README.md`."""
    base_model = cfg.base_model or os.path.basename(os.path.normpath(source.path))
    parameters = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.init and f.name not in ("overwrite",)}
    data = ModelCardData(base_model=base_model, library_name="transformers", tags=["moe", "upcycled", "hf-moe"],
                         pipeline_tag="text-generation")
    card = ModelCard.from_template(
        data, template_str=_template(), model_name=os.path.basename(report.output_dir), base_model=base_model,
        parameters=parameters, total_params=f"{report.total_params:,}", active_params=f"{report.active_params:,}",
        moe_layers=config.moe_layer_indices, verification=_verification(cfg, report),
    )
    card.save(os.path.join(folder, "README.md"))
