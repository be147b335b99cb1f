"""`python -m benchmarks upcycling-quality --tiny`, cut to a few steps: the pipeline runs end to end on a CPU, every
run starts from the base it claims to, and the report merges the rows."""

import json
import sys

import pytest

from benchmarks import upcycling_quality, upcycling_report


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("upq")
    argv = sys.argv
    sys.argv = ["upcycling-quality", "--tiny", "--runs", "a0,b0,c0,d0", "--pretrain-steps", "8", "--continue-steps",
                "4", "--evals", "1", "--corpus-bytes", "300000", "--out-dir", str(out), "--tag", "t"]
    try:
        upcycling_quality.main()
    finally:
        sys.argv = argv
    return [json.loads(line) for line in (out / "upcycling-quality-t.jsonl").read_text().splitlines()]


def test_runs_start_from_the_base_and_see_equal_tokens(rows):
    base = next(r for r in rows if r["kind"] == "base")
    runs = {r["run"]: r for r in rows if r["kind"] == "run"}
    assert set(runs) == {"a0", "b0", "c0", "d0"}
    # The first point of each run is measured before its first step: the dense model reloaded with its optimizer
    # state, and the function-preserving conversions, compute the base's held-out loss (float32 on the CPU).
    for run in ("a0", "b0", "d0"):
        assert runs[run]["curve"][0][1] == pytest.approx(base["heldout"], rel=1e-5), run
    assert abs(runs["c0"]["curve"][0][1] - base["heldout"]) > 2e-4  # drop-upcycling re-initialises neurons
    assert runs["c0"]["function_preserving"] is False and runs["b0"]["function_preserving"] is True
    assert len({r["curve"][-1][0] for r in runs.values()}) == 1  # every run ends after the same tokens
    assert runs["b0"]["params_active"] < runs["b0"]["params_total"]
    assert runs["a0"]["params_active"] == runs["a0"]["params_total"] == base["params_total"]


def test_report_merges_the_rows(rows, tmp_path):
    text = upcycling_report.section(rows, None, None)
    for key in "abcd":
        assert f"| ({key}) " in text
    assert text.startswith(upcycling_report.BEGIN) and text.endswith(upcycling_report.END)
