"""PEFT helpers: a `LoraConfig` that knows where an hf-moe model keeps its weights."""

from __future__ import annotations

from peft import LoraConfig


def lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    attention: bool = True,
    experts: bool = True,
    router: bool = False,
    dense_mlp: bool = True,
    shared_experts: bool = True,
    **kwargs,
) -> LoraConfig:
    """Build a `LoraConfig` for an hf-moe model.

    Args:
        r, lora_alpha: LoRA rank and scaling numerator.
        attention: adapt `q_proj`, `k_proj`, `v_proj`, `o_proj`; with multi-head latent attention `q_proj` or
            `q_a_proj`/`q_b_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`.
        experts: adapt the routed experts' 3D weights (`mlp.experts.gate_up_proj`, or `up_proj` of non-gated
            experts, and `mlp.experts.down_proj`)
            through PEFT's `target_parameters`, one low-rank update per expert; works when the experts are
            sharded by expert parallelism, since each rank holds its experts as plain parameters.
        router: adapt the router weight (`mlp.router.weight`) as well.
        dense_mlp: adapt the MLPs of dense (non-MoE) layers.
        shared_experts: adapt the shared experts' projections.
        **kwargs: passed to `LoraConfig` (e.g. `lora_dropout`, `init_lora_weights`).
    """
    modules: list[str] = []
    if attention:
        modules += ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]
    if dense_mlp:
        modules += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if shared_experts:
        modules += ["shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]
    parameters: list[str] = []
    if experts:
        parameters += ["mlp.experts.gate_up_proj", "mlp.experts.up_proj", "mlp.experts.down_proj"]
    if router:
        parameters.append("mlp.router.weight")
    if not modules and not parameters:
        raise ValueError("lora_config: nothing to adapt; set at least one of attention, experts, router, "
                         "dense_mlp, shared_experts to True.")
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=modules or None,
        target_parameters=parameters or None,
        task_type=kwargs.pop("task_type", "CAUSAL_LM"),
        **kwargs,
    )
