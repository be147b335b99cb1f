"""Bad input is refused with a clear error before anything is written; interrupted conversions leave nothing behind;
the CLI (`python -m conversions upcycle`) works end to end."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import conversions.safetensors_io
import conversions.upcycling
from conversions import CheckpointError, UnsupportedSourceError, UpcycleConfig, UpcycleError, upcycle
from conversions.cli import main as cli_main

from .test_upcycle import random_batch, save_dense

REPO = Path(__file__).resolve().parent.parent


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_refused(tmp_path, src, error, match, **settings):
    """`upcycle` raises `error` mentioning `match`, and no output or temporary folder appears."""
    before = entries(tmp_path)
    with pytest.raises(error, match=match):
        upcycle(src, tmp_path / "out", UpcycleConfig(progress=False, **settings))
    assert entries(tmp_path) == before


def test_unsupported_architecture_is_refused_with_the_supported_list(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    assert_refused(tmp_path, tmp_path / "gpt2", UnsupportedSourceError, r"'gpt2'.*llama.*mistral.*qwen2.*qwen3")


def test_pickle_checkpoints_are_refused_without_being_unpickled(tmp_path):
    src = tmp_path / "dense"
    save_dense("llama", src)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not a pickle: loading this would raise an unpickling error")
    assert_refused(tmp_path, src, CheckpointError, r"pytorch_model\.bin.*never loads")


def test_missing_and_corrupt_shards_and_tensors_are_refused(tmp_path):
    src = tmp_path / "dense"
    save_dense("mistral", src)
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, src, CheckpointError, rf"{shards[1].name}.*(truncated|corrupt)")
    shards[1].unlink()
    assert_refused(tmp_path, src, CheckpointError, rf"{shards[1].name}.*missing")

    single = tmp_path / "single"
    save_dense("llama", single)
    tensors = load_file(single / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, single / "model.safetensors", metadata={"format": "pt"})
    assert_refused(tmp_path, single, CheckpointError, r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight")


def test_sources_hf_moe_cannot_express_exactly_are_refused(tmp_path):
    save_dense("llama", tmp_path / "mlp_bias", mlp_bias=True)
    assert_refused(tmp_path, tmp_path / "mlp_bias", UnsupportedSourceError, r"mlp_bias=True")
    save_dense("qwen2", tmp_path / "mixed", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert_refused(tmp_path, tmp_path / "mixed", UnsupportedSourceError, r"max_window_layers=1")


@pytest.mark.parametrize("settings, match", [
    ({"num_experts": 6, "top_k": 2, "granularity": 4},
     r"num_experts=6 is invalid: expected a multiple of granularity=4"),
    ({"num_experts": 8, "top_k": 3, "granularity": 2}, r"top_k=3 is invalid: expected a multiple of granularity=2"),
    ({"num_experts": 10, "top_k": 5, "granularity": 5}, r"granularity=5 is invalid: expected a divisor of .*=48"),
    ({"num_experts": 4, "top_k": 2, "granularity": 2, "shared_experts": 1}, r"shared_experts=1 is invalid"),
    ({"num_experts": 4, "top_k": 2, "granularity": 2, "router_init": "zeros"}, r"router_init='zeros' is invalid"),
    ({"num_experts": 4, "top_k": 5}, r"top_k=5 is invalid: expected at most num_experts=4"),
    ({"init": "noise"}, r"init='noise' is invalid"),
    ({"init": "drop:1.5"}, r"init='drop:1.5' is invalid"),
    ({"moe_layers": "0,7"}, r"moe_layers=\[0, 7\] is invalid"),
    ({"router_init": "kmeans"}, r"calibration_file=None is invalid"),
    ({"max_shard_size": "lots"}, r"max_shard_size='lots' is invalid"),
])
def test_incompatible_settings_are_refused(tmp_path, settings, match):
    save_dense("llama", tmp_path / "dense")
    assert_refused(tmp_path, tmp_path / "dense", UpcycleError, match, **settings)


def test_non_empty_target_is_refused_and_untouched_unless_overwrite(tmp_path):
    save_dense("qwen3", tmp_path / "dense")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    assert_refused(tmp_path, tmp_path / "dense", UpcycleError, r"not empty.*--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"

    upcycle(tmp_path / "dense", tmp_path / "out", UpcycleConfig(num_experts=2, top_k=1, overwrite=True,
                                                                progress=False))
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()
    assert entries(tmp_path) == {"dense", "out"}


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("existing_target", [False, True])
def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch, interrupt, existing_target):
    save_dense("llama", tmp_path / "dense")
    if existing_target:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("old model")
    before = entries(tmp_path)
    write_tensor, calls = conversions.safetensors_io._write_tensor, []

    def failing_write(f, planned):
        calls.append(planned.name)
        if len(calls) == 7:
            raise interrupt("stopped mid-conversion")
        write_tensor(f, planned)

    monkeypatch.setattr(conversions.safetensors_io, "_write_tensor", failing_write)
    with pytest.raises(interrupt):
        upcycle(tmp_path / "dense", tmp_path / "out" / "nested" if not existing_target else tmp_path / "out",
                UpcycleConfig(num_experts=4, top_k=2, overwrite=existing_target, progress=False))
    assert len(calls) == 7
    assert entries(tmp_path) == before, "no target and no temporary folder may remain"
    if existing_target:
        assert entries(tmp_path / "out") == {"keep.txt"}


CTRL_C_CHILD = """
import pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also when started from a background job
import conversions.safetensors_io as io
from conversions.cli import main
write_tensor, calls = io._write_tensor, []
def slow_write(f, planned):  # stall mid-conversion until the parent sends SIGINT
    calls.append(planned.name)
    if len(calls) == 5:
        pathlib.Path(sys.argv[3]).write_text("writing")
        time.sleep(120)
    write_tensor(f, planned)
io._write_tensor = slow_write
sys.exit(main(["upcycle", sys.argv[1], sys.argv[2], "--num-experts", "4", "--top-k", "2", "--no-progress"]))
"""


def test_ctrl_c_leaves_no_target_and_no_temporary_folder(tmp_path):
    work = tmp_path / "work"
    save_dense("llama", work / "dense")
    marker = tmp_path / "marker"
    before = entries(work)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, str(work / "dense"), str(work / "out"), str(marker)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), child.communicate()[1]
    assert any(name.endswith(".upcycling") for name in entries(work)), "the temporary folder should exist mid-way"
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "interrupted; nothing was written" in err
    assert entries(work) == before


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    save_dense("llama", tmp_path / "dense")
    real_verify = conversions.upcycling.verify_upcycle

    def sabotaged(source, output, **kwargs):  # a 1% wrong down_proj scale in one layer, as a converter bug would
        path = Path(output) / "model.safetensors"
        tensors = load_file(path)
        tensors["model.layers.1.mlp.experts.down_proj"] *= 1.01
        save_file(tensors, path, metadata={"format": "pt"})
        return real_verify(source, output, **kwargs)

    monkeypatch.setattr(conversions.upcycling, "verify_upcycle", sabotaged)
    assert_refused(tmp_path, tmp_path / "dense", UpcycleError, r"(?s)verification failed.*FAIL", num_experts=4, top_k=2,
                   verify=True)


def test_cli_upcycles_verifies_and_refuses_bad_input(tmp_path):
    dense = save_dense("qwen2", tmp_path / "dense")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(
        [sys.executable, "-m", "conversions", "upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"),
         "--num-experts", "8", "--top-k", "4", "--granularity", "2", "--shared-experts", "2", "--moe-layers",
         "every-other", "--verify", "--no-progress"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "PASS" in run.stdout and "max |Δ logits|" in run.stdout
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["moe_layers"] == [0, 2]
    ids, _ = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)

    bad = subprocess.run(
        [sys.executable, "-m", "conversions", "upcycle", str(tmp_path / "dense"), str(tmp_path / "bad"),
         "--num-experts", "8", "--top-k", "3", "--granularity", "2", "--no-progress"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert bad.returncode == 2
    assert "error: top_k=3 is invalid" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_cli_says_when_the_function_changes_by_design(tmp_path, capsys):
    save_dense("mistral", tmp_path / "dense")
    code = cli_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4", "--top-k", "2",
                     "--init", "noise:0.02", "--verify", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "the function changes by design (init=noise:0.02" in out and "max rel" in out


SMALL = ["--num-experts", "4", "--top-k", "2", "--no-progress"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_upcycle_into_the_working_directory(tmp_path, monkeypatch, overwrite):
    """`hf-moe upcycle SRC .` from an empty folder, or over an old model with --overwrite: the folder itself stays
    (it is the shell's working directory) and ends up holding exactly the new model."""
    save_dense("llama", tmp_path / "dense")
    here = tmp_path / "here"
    here.mkdir()
    if overwrite:
        (here / "old-model.txt").write_text("replaced")
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    assert cli_main(["upcycle", str(tmp_path / "dense"), ".", *SMALL, *(["--overwrite"] if overwrite else [])]) == 0
    assert entries(tmp_path) == {"dense", "here"}, "no temporary or replaced folder may remain"
    assert here.stat().st_ino == inode and os.path.samefile(Path.cwd(), here)
    assert entries(here) == {"config.json", "generation_config.json", "model.safetensors", "README.md"}
    model = AutoModelForCausalLM.from_pretrained(here)
    assert model.config.num_experts == 4


def test_sigterm_leaves_no_target_and_no_temporary_folder(tmp_path):
    work = tmp_path / "work"
    save_dense("llama", work / "dense")
    marker = tmp_path / "marker"
    before = entries(work)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen([sys.executable, "-c", CTRL_C_CHILD, str(work / "dense"), str(work / "out"), str(marker)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), child.communicate()[1]
    assert any(name.endswith(".upcycling") for name in entries(work)), "the temporary folder should exist mid-way"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM and "terminated; nothing was written" in err, err
    assert entries(work) == before


@pytest.mark.parametrize("init", ["noise:inf", "noise:nan", "noise:1e999", "noise:-inf", "drop:nan"])
def test_non_finite_init_values_are_refused(tmp_path, init):
    save_dense("llama", tmp_path / "dense")
    assert_refused(tmp_path, tmp_path / "dense", UpcycleError, rf"init='{init}' is invalid: .*finite", init=init)


@pytest.mark.parametrize("front_matter", ["license: [unclosed", "- a list\n- not a mapping"])
def test_broken_source_model_card_is_named_before_anything_is_written(tmp_path, monkeypatch, front_matter):
    save_dense("llama", tmp_path / "dense")
    (tmp_path / "dense" / "README.md").write_text(f"---\n{front_matter}\n---\n# dense\n")
    writes = []
    monkeypatch.setattr(conversions.safetensors_io, "_write_tensor", lambda f, planned: writes.append(planned.name))
    assert_refused(tmp_path, tmp_path / "dense", CheckpointError, r"dense/README\.md has YAML front matter",
                   num_experts=4, top_k=2)
    assert writes == []


def test_full_disk_gives_one_line_and_keeps_the_old_output(tmp_path, monkeypatch, capsys):
    save_dense("llama", tmp_path / "dense")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old model")
    before = entries(tmp_path)
    write_tensor, calls = conversions.safetensors_io._write_tensor, []

    def full_disk(f, planned):
        calls.append(planned.name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_tensor(f, planned)

    monkeypatch.setattr(conversions.safetensors_io, "_write_tensor", full_disk)
    capsys.readouterr()
    code = cli_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "out"), *SMALL, "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"{os.strerror(errno.ENOSPC)} (writing {tmp_path / 'out'}); nothing was written" in err
    assert entries(tmp_path) == before and entries(tmp_path / "out") == {"keep.txt"}


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_target_gives_one_line(tmp_path, capsys):
    save_dense("llama", tmp_path / "dense")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    capsys.readouterr()
    try:
        code = cli_main(["upcycle", str(tmp_path / "dense"), str(locked / "out"), *SMALL])
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Permission denied" in err and str(locked) in err, err
    assert entries(locked) == set()


def test_output_folder_has_the_permissions_of_a_plain_mkdir(tmp_path):
    save_dense("llama", tmp_path / "dense")
    previous = os.umask(0o027)
    try:
        upcycle(tmp_path / "dense", tmp_path / "out", UpcycleConfig(num_experts=4, top_k=2, progress=False))
        (tmp_path / "mkdir").mkdir()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == stat.S_IMODE((tmp_path / "mkdir").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
