"""`benchmarks.record.ResultFile`: one file per run, in `benchmarks/results/` or the folder `HF_MOE_RESULTS` names."""

from __future__ import annotations

import json

from benchmarks.record import RESULTS, ResultFile


def test_rows_go_to_the_folder_hf_moe_results_names(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_MOE_RESULTS", str(tmp_path / "out"))
    with ResultFile("benchmarks.ep_scaling") as results:
        results.write({"a": 1})
        results.write({"b": 2.5})
    (written,) = (tmp_path / "out").iterdir()
    assert written.name.startswith("ep-scaling-") and written.suffix == ".jsonl"
    assert [json.loads(line) for line in written.read_text().splitlines()] == [{"a": 1}, {"b": 2.5}]
    assert f"results: {written}" in capsys.readouterr().out


def test_default_folder_and_explicit_path(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_MOE_RESULTS", raising=False)
    assert ResultFile("benchmarks.layer").path.parent == RESULTS
    monkeypatch.setenv("HF_MOE_RESULTS", str(tmp_path))
    assert ResultFile("benchmarks.layer", tmp_path / "x.jsonl").path == tmp_path / "x.jsonl"  # --out wins
    empty = ResultFile("benchmarks.layer")
    empty.close()  # no row, no file
    assert not any(tmp_path.iterdir())
