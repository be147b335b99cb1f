"""`python -m benchmarks compile`: its two models compute the same function at both shapes, and its target lines
judge the ratios they name (the timed parts need a GPU; `--tiny` is a manual CPU smoke run, too slow for the suite)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.compile import decode
from benchmarks.compile_models import TINY, build_models, logits_check
from benchmarks.compile_report import check_failed, summary, target_lines


@pytest.mark.parametrize("shape", sorted(TINY))
def test_models_hold_the_same_weights(shape):
    models = build_models(TINY[shape], 2, "cpu", torch.float32)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = (models[name].eval()(input_ids=ids).logits for name in ("hf-moe", "transformers"))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    row = logits_check(models, "cpu")
    assert row["ok"] and row["value"] < 1e-5 and not check_failed([row])


def test_logits_check_fails_on_a_changed_weight():
    models = build_models(TINY["mixtral"], 2, "cpu", torch.float32)
    with torch.no_grad():
        models["hf-moe"].model.layers[1].mlp.experts.down_proj[0] *= 1.01
    row = logits_check(models, "cpu")
    assert not row["ok"] and check_failed([row])


def test_target_lines():
    rows = {"train_hf-moe_compiled": 130.0, "train_transformers_compiled": 90.0,
            "train_transformers-flex_attention_compiled": 100.0, "train_transformers_eager": 200.0,
            "generate_bs16_hf-moe_static": 140.0, "generate_bs16_transformers_static": 100.0,
            "generate_bs1_hf-moe_static": 300.0, "generate_bs1_hf-moe_dynamic": 100.0,
            "generate_bs1_hf-moe_default": 200.0, "train-alternating_hf-moe_compiled": 125.0,
            "train-alternating_transformers-flex_attention_compiled": 100.0}
    lines = target_lines({what: {"tokens_per_s": tps} for what, tps in rows.items()})
    assert lines == [  # training against transformers' fastest compiled row (flex), not its default or eager one
        "target compiled training hf-moe / transformers' fastest compiled >= 1.3: measured 1.3 (met)",
        "target compiled training, steps alternating, hf-moe / transformers' fastest compiled >= 1.3: measured 1.25 "
        "(not met)",
        "target compiled training, steps back to back, hf-moe / transformers' fastest compiled >= 1.3: measured - "
        "(not measured)",
        "target compiled generate bs16 hf-moe / transformers >= 1.5: measured 1.4 (not met)",
        "target compiled generate bs1 hf-moe / transformers >= 1.0: measured - (not measured)",
        "target hf-moe generate bs1 compiled / plain generate (no compile) <= 2.0: measured 1.5 (met)",
    ]
    rows["train_transformers-flex_attention_compiled"] = 110.0
    assert "measured 1.182 (not met)" in target_lines({w: {"tokens_per_s": t} for w, t in rows.items()})[0]


def test_training_part_trains_transformers_with_each_peer_attention_compiled(monkeypatch):
    """The peer's other attention kernels are timed compiled only, and each model gets its attention back."""
    import benchmarks.compile as bench

    models = build_models(TINY["qwen3"], 1, "cpu", torch.float32)
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model: model)
    monkeypatch.setattr(bench, "seconds_per_call", lambda step, reps, device: 1.0)
    monkeypatch.setattr(bench, "first_call_seconds", lambda step, device: (
        seen.append(models["transformers"].config._attn_implementation), step())[1] or 0.0)
    rows: list[dict] = []
    bench.train(models, 1, 8, "cpu", rows.append, ("eager", "compiled"), peer_attention=("eager",))
    assert [r["what"] for r in rows] == ["train_hf-moe_eager", "train_hf-moe_compiled", "train_transformers_eager",
                                         "train_transformers_compiled", "train_transformers-eager_compiled"]
    assert seen[-3:] == ["sdpa", "sdpa", "eager"] and all("error" not in r for r in rows)
    assert models["transformers"].config._attn_implementation == "sdpa"


def test_fastest_peer_is_the_attention_of_transformers_fastest_compiled_row():
    from benchmarks.compile import fastest_peer

    rows = [{"what": "train_transformers_compiled", "tokens_per_s": 100.0},
            {"what": "train_transformers-flex_attention_compiled", "tokens_per_s": 110.0},
            {"what": "train_transformers_eager", "tokens_per_s": 200.0},
            {"what": "train_hf-moe_compiled", "tokens_per_s": 300.0},
            {"what": "train_transformers-eager_compiled", "error": "no"}]
    assert fastest_peer(rows) == "flex_attention"
    rows[0]["tokens_per_s"] = 120.0
    assert fastest_peer(rows) is None and fastest_peer([]) is None


def test_head_to_head_alternates_the_two_compiled_steps(monkeypatch):
    """Both models are compiled at once (the peer with its fastest attention), timed in rounds that alternate them and
    back to back, and get their attention back."""
    import benchmarks.compile as bench

    models = build_models(TINY["qwen3"], 1, "cpu", torch.float32)
    compiled, order = [], []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    for name, model in models.items():
        model.register_forward_pre_hook(lambda m, args, name=name: order.append(
            (name, m.config._attn_implementation)))
    rows: list[dict] = []
    bench.head_to_head(models, 2, 8, "cpu", rows.append, "eager")
    assert [r["what"] for r in rows] == [
        "train-alternating_hf-moe_compiled", "train-alternating_transformers-eager_compiled",
        "train-back-to-back_hf-moe_compiled", "train-back-to-back_transformers-eager_compiled"]
    assert compiled == [models["hf-moe"], models["transformers"]]
    # 2 warm-up rounds and 2 timed ones alternate the models; then each model's back-to-back steps
    assert order == [("hf-moe", "sdpa"), ("transformers", "eager")] * 4 + \
        [("hf-moe", "sdpa")] * bench.BACK_TO_BACK + [("transformers", "eager")] * bench.BACK_TO_BACK
    assert all(r["tokens_per_s"] > 0 for r in rows) and all(r["host_ms"] > 0 for r in rows[:2])
    assert models["transformers"].config._attn_implementation == "sdpa"


def test_decode_part_times_both_models_and_reports_their_ratio(capsys):
    models = build_models(TINY["qwen3"], 2, "cpu", torch.float32)
    rows: list[dict] = []
    decode(models, 3, "cpu", rows.append, (1,), reps=1)
    assert [r["what"] for r in rows] == ["decode_bs1_hf-moe", "decode_bs1_transformers"]
    assert all(isinstance(r["ms_per_step"], float) and r["batch"] == 1 for r in rows)
    summary(rows)
    assert "eager decode bs1 ms/step: hf-moe " in capsys.readouterr().out


def test_kernel_profile_sums_by_kind_and_finds_the_idle_gpu():
    from benchmarks.kernel_profile import summarize

    kernels = [  # (start µs, end µs, name): names as torch.profiler gave them on an H100
        (0, 1000, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1x1"),
        (500, 1500, "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"),  # overlaps the first: busy counts it once
        (2000, 2600, "_grouped_mm_kernel"), (2600, 3000, "_gather_rows_kernel"),
        (3500, 4000, "triton_red_fused__log_softmax__log_softmax_backward_data__to_copy"),
        (4000, 4300, "_grouped_mm_kernel"),
    ]
    got = summarize(kernels)
    assert got["kernel_ms"] == {"attention": 1.0, "dense GEMM (cuBLAS)": 1.0, "routed GEMM": 0.9, "inductor": 0.5,
                                "expert glue": 0.4}
    assert (got["kernels_ms"], got["busy_ms"], got["span_ms"], got["idle_ms"]) == (3.8, 3.3, 4.3, 1.0)
    assert got["top_kernels"][0][0].startswith("cudnn_generated") and len(got["top_kernels"][0][0]) == 80
    assert got["top_kernels"][2] == ["_grouped_mm_kernel", 0.9, 2]  # summed over its launches
    assert len(summarize(kernels, top=2)["top_kernels"]) == 2
    # the waits, longest first, between the kernel that ended last and the next one to start
    assert got["longest_gaps"] == [
        [0.5, "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "_grouped_mm_kernel"],
        [0.5, "_gather_rows_kernel", "triton_red_fused__log_softmax__log_softmax_backward_data__to"],
    ]
    two = summarize(kernels, steps=2)  # the same kernels as two steps: everything per step
    assert (two["busy_ms"], two["idle_ms"], two["steps"], two["kernel_ms"]["attention"]) == (1.65, 0.5, 2, 0.5)
    assert two["top_kernels"][2] == ["_grouped_mm_kernel", 0.45, 1]


def test_plan_variants_train_the_same_model_under_their_plan(monkeypatch):
    import contextlib

    import benchmarks.compile as bench
    import benchmarks.compile_models as compile_models

    models = build_models(TINY["qwen3"], 1, "cpu", torch.float32)
    plans = []
    monkeypatch.setitem(compile_models.VARIANTS, "hf-moe-no-quack",
                        lambda: plans.append("no-quack") or contextlib.nullcontext())
    monkeypatch.setattr(bench, "seconds_per_call", lambda step, reps, device: 1.0)
    rows: list[dict] = []
    bench.train({"hf-moe": models["hf-moe"], "hf-moe-no-quack": models["hf-moe"]}, 1, 8, "cpu", rows.append,
                ("eager",))
    assert [r["what"] for r in rows] == ["train_hf-moe_eager", "train_hf-moe-no-quack_eager"]
    assert plans == ["no-quack", "no-quack"]  # the variant's first call and warm-up step, not hf-moe's


def test_llama_rope_variant_takes_rope_from_llamas_operators(monkeypatch):
    """`hf-moe-llama-rope` computes RoPE's cosines with Llama's operators instead of hf-moe's custom op, to the same
    logits (the A/B of that op in one run)."""
    import hf_moe.attention
    from benchmarks.compile_models import VARIANTS

    from .conftest import count_calls

    model = build_models(TINY["qwen3"], 1, "cpu", torch.float32)["hf-moe"].eval()
    calls = count_calls(monkeypatch, hf_moe.attention, "rotary_cos_sin")
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert len(calls) == 1
        with VARIANTS["hf-moe-llama-rope"]():
            got = model(input_ids=ids).logits
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_kernel_variants_switch_their_kernel_off():
    """`hf-moe-unfused-norm-rope` turns the fused q/k norm + RoPE off (torch's operators in every layer) and
    `hf-moe-two-acc` the fused gate/up kernel's single accumulator, each only inside its block."""
    import importlib.util

    import hf_moe.attention
    from benchmarks.compile_models import VARIANTS

    config = TINY["qwen3"]
    attention = build_models(config, 1, "cpu", torch.float32)["hf-moe"].model.layers[0].self_attn
    assert attention.norm_rope_fusable and hf_moe.attention.FUSED_NORM_ROPE
    with VARIANTS["hf-moe-unfused-norm-rope"]():
        assert not hf_moe.attention.FUSED_NORM_ROPE
    assert hf_moe.attention.FUSED_NORM_ROPE
    if importlib.util.find_spec("triton") is not None:
        from hf_moe.moe.kernels import grouped_gemm

        with VARIANTS["hf-moe-two-acc"]():
            assert grouped_gemm.ONE_ACCUMULATOR_MAX_K == 0
        assert grouped_gemm.ONE_ACCUMULATOR_MAX_K == 4096
