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
    rows = {"train_hf-moe_compiled": 130.0, "train_transformers_compiled": 100.0,
            "generate_bs16_hf-moe_static": 140.0, "generate_bs16_transformers_static": 100.0,
            "generate_bs1_hf-moe_static": 300.0, "generate_bs1_hf-moe_dynamic": 100.0,
            "generate_bs1_hf-moe_graphs": 200.0}
    lines = target_lines({what: {"tokens_per_s": tps} for what, tps in rows.items()})
    assert lines == [
        "target compiled training hf-moe / transformers >= 1.3: measured 1.3 (met)",
        "target compiled generate bs16 hf-moe / transformers >= 1.5: measured 1.4 (not met)",
        "target compiled generate bs1 hf-moe / transformers >= 1.0: measured - (not measured)",
        "target hf-moe generate bs1 compiled / eager <= 2.0: measured 3.0 (not met)",
        "target hf-moe generate bs1 compiled / eager CUDA-graph decode (no compile) <= 2.0: measured 1.5 (met)",
    ]


def test_decode_part_times_both_models_and_reports_their_ratio(capsys):
    models = build_models(TINY["qwen3"], 2, "cpu", torch.float32)
    rows: list[dict] = []
    decode(models, 3, "cpu", rows.append, (1,), reps=1)
    assert [r["what"] for r in rows] == ["decode_bs1_hf-moe", "decode_bs1_transformers"]
    assert all(isinstance(r["ms_per_step"], float) and r["batch"] == 1 for r in rows)
    summary(rows)
    assert "eager decode bs1 ms/step: hf-moe " in capsys.readouterr().out
