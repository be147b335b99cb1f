"""`hf_moe.checkpoint_files.tensor_files`: the one reader of safetensors checkpoint folders, shared by the
expert-parallel loader and the converters."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_moe.checkpoint_files import CheckpointError, tensor_files

REPO = Path(__file__).resolve().parent.parent


def save_sharded(folder: Path) -> dict[str, str]:
    """Two shards and an index, written by hand; returns the weight map."""
    folder.mkdir()
    weight_map = {"a": "one.safetensors", "b": "one.safetensors", "c": "two.safetensors"}
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, folder / "one.safetensors")
    save_file({"c": torch.ones(1)}, folder / "two.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_and_single_file_checkpoints_map_every_tensor_to_its_file(tmp_path):
    weight_map = save_sharded(tmp_path / "sharded")
    assert tensor_files(tmp_path / "sharded") == {k: tmp_path / "sharded" / v for k, v in weight_map.items()}

    (tmp_path / "single").mkdir()
    save_file({"x": torch.zeros(1), "y": torch.zeros(2)}, tmp_path / "single" / "model.safetensors")
    with safe_open(tmp_path / "single" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert tensor_files(str(tmp_path / "single")) == dict.fromkeys(names, tmp_path / "single" / "model.safetensors")


def test_missing_folder_files_and_broken_indexes_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        tensor_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty has neither model\.safetensors nor model\.safetensors\.index"):
        tensor_files(tmp_path / "empty")

    save_sharded(tmp_path / "bad_json")
    (tmp_path / "bad_json" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bad_json/model\.safetensors\.index\.json is not a valid"):
        tensor_files(tmp_path / "bad_json")

    save_sharded(tmp_path / "lost_shard")
    (tmp_path / "lost_shard" / "two.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"two\.safetensors listed in model\.safetensors\.index\.json are"):
        tensor_files(tmp_path / "lost_shard")

    save_sharded(tmp_path / "wrong_map")
    index = tmp_path / "wrong_map" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "two.safetensors", "c": "two.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"maps 1 tensor\(s\) to shards that do not hold them.*'a'"):
        tensor_files(tmp_path / "wrong_map")

    save_sharded(tmp_path / "truncated")
    shard = tmp_path / "truncated" / "one.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"one\.safetensors is not a readable safetensors file"):
        tensor_files(tmp_path / "truncated")


def test_library_code_reads_the_index_in_one_place():
    readers = sorted(str(p.relative_to(REPO)) for package in ("hf_moe", "conversions")
                     for p in (REPO / package).rglob("*.py") if '"model.safetensors.index.json"' in p.read_text())
    assert readers == ["hf_moe/checkpoint_files.py"]
