"""checkpoint.Checkpoint (index validation, lazy reads), plan.parse_size, output.output_config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.checkpoint import Checkpoint
from mergeflow.errors import CheckpointError, InputError
from mergeflow.output import output_config
from mergeflow.plan import parse_size

TENSORS_A = {"model.a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
             "model.b.weight": torch.ones(4, dtype=torch.bfloat16)}
TENSORS_B = {"model.c.weight": torch.full((3,), 7, dtype=torch.int64)}


def _sharded(folder, weight_map=None):
    """A two-shard checkpoint with an index (optionally a custom weight_map)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(TENSORS_A, str(folder / "model-00001-of-00002.safetensors"))
    save_file(TENSORS_B, str(folder / "model-00002-of-00002.safetensors"))
    if weight_map is None:
        weight_map = {k: "model-00001-of-00002.safetensors" for k in TENSORS_A}
        weight_map.update({k: "model-00002-of-00002.safetensors" for k in TENSORS_B})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def test_sharded_checkpoint_reads_lazily_and_exactly(tmp_path):
    ckpt = Checkpoint(_sharded(tmp_path / "ckpt"))
    assert ckpt.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(ckpt.tensors) == set(TENSORS_A) | set(TENSORS_B)
    info = ckpt.tensors["model.b.weight"]
    assert (info.file, info.shape, info.dtype, info.nbytes) == (
        "model-00001-of-00002.safetensors", (4,), "BF16", 8)
    for name, tensor in {**TENSORS_A, **TENSORS_B}.items():
        assert torch.equal(ckpt.read(name), tensor)


def test_single_file_checkpoint(tmp_path):
    save_file(TENSORS_A, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    assert ckpt.files == ["model.safetensors"] and set(ckpt.tensors) == set(TENSORS_A)


@pytest.mark.parametrize("escape", ["parent", "absolute"])
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, escape):
    # A real, readable safetensors file outside the checkpoint: only the path check stops it.
    outside = tmp_path / "x.safetensors"
    save_file({"model.evil.weight": torch.zeros(2)}, str(outside))
    name = "../x.safetensors" if escape == "parent" else str(outside)
    folder = _sharded(tmp_path / "ckpt")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.evil.weight"] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(CheckpointError) as caught:
        Checkpoint(folder)
    assert name in str(caught.value)
    assert "model.safetensors.index.json" in str(caught.value)


def test_index_mapping_a_key_to_the_wrong_shard_is_refused(tmp_path):
    folder = _sharded(tmp_path / "ckpt")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.c.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.c\.weight"):
        Checkpoint(folder)


def test_tensor_in_two_shards_is_refused(tmp_path):
    folder = _sharded(tmp_path / "ckpt")
    save_file({**TENSORS_B, "model.a.weight": torch.zeros(2, 3)},
              str(folder / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.a\.weight"):
        Checkpoint(folder)


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    folder = _sharded(tmp_path / "ckpt")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        Checkpoint(folder)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"metadata": {}}'])
def test_unreadable_index_is_refused(tmp_path, text):
    folder = _sharded(tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        Checkpoint(folder)


def test_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(CheckpointError) as caught:
        Checkpoint(tmp_path)
    assert isinstance(caught.value, InputError)


def test_truncated_file_is_refused_when_opened(tmp_path):
    save_file(TENSORS_A, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(("text", "expected"), [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("500MiB", 500 * 2**20),
    ("100KB", 100_000), ("50kb", 50_000), (" 10 KiB ", 10 * 1024), ("1.5KB", 1500),
    ("0.5GiB", 2**29), ("1000", 1000), ("7B", 7), ("1TB", 10**12), (123, 123),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "5XB", "GB", "", "0", "0KB", "-1GB", "1e3", "5 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(InputError, match="`max_shard_size`"):
        parse_size(text)


def test_output_config_drops_quantization_and_sets_dtype():
    base = {"model_type": "llama", "hidden_size": 64, "torch_dtype": "float16", "dtype": "float16",
            "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True},
            "rope_parameters": {"rope_theta": 10000.0}}
    config = output_config(base, "bfloat16")
    assert "quantization_config" not in config
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if "dtype" not in k} == {
        k: v for k, v in base.items() if "dtype" not in k and k != "quantization_config"}
    assert "quantization_config" in base  # the caller's dict is not modified
