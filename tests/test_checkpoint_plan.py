"""checkpoint.Checkpoint (index validation, lazy reads), plan.parse_size, output.output_config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mergeflow.errors import CheckpointError, InputError
from mergeflow.model.checkpoint import Checkpoint
from mergeflow.output.folder import output_config
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


def test_plan_entries_round_trip_with_their_op_and_source_types(tmp_path):
    """Every source, op and encoding kind survives the plan file (the discriminated unions read
    back as the same classes), and the fingerprint with them."""
    from mergeflow.model.quant import QuantSpec
    from mergeflow.plan import (
        AdapterTensor,
        BaseTensor,
        EmbeddingLora,
        Experts,
        Lora,
        LoraBias,
        LoraPart,
        MergePlan,
        OriginalTensor,
        QuantizedUnit,
        Requantize,
        Resize,
        ShardPlan,
        Stored,
        TensorPart,
        TensorPlan,
        TokenRows,
    )

    part = LoraPart(expert=1, experts=4, b_left=True, transposed=False, rows=(0, 1, 8),
                    cols=(8, 1, 8), scale=2.0)
    unit = QuantSpec(weight="w", method="bnb4", shape=[8, 64], dtype="F32", blocksize=64,
                     quant_type="nf4", siblings={"absmax": "w.absmax"})
    entries = [
        TensorPlan(name="e", dtype="BF16", shape=[10, 8], source=AdapterTensor(name="a"),
                   ops=[Resize(rows=10), EmbeddingLora(module="e"), TokenRows(module="e")]),
        TensorPlan(name="q", dtype="F32", shape=[8, 8], source=OriginalTensor(name="q"),
                   ops=[Lora(module="q", transposed=True)]),
        TensorPlan(name="x", dtype="F32", shape=[8, 16], source=BaseTensor(name="x"),
                   ops=[Lora(module="x", part=part)]),
        TensorPlan(name="f", dtype="F32", shape=[4, 8, 16], source=BaseTensor(name="f"),
                   ops=[Experts(module="f", first=part, count=4, rows_per_expert=8)]),
        TensorPlan(name="b", dtype="F32", shape=[8], source=BaseTensor(name="b"),
                   ops=[LoraBias(module="b")]),
        TensorPlan(name="w", dtype="U8", shape=[256, 1], source=QuantizedUnit(unit=unit),
                   ops=[Lora(module="w")], encoding=Requantize(unit=unit),
                   parts=[TensorPart(name="w.absmax", dtype="F32", shape=[8])]),
        TensorPlan(name="s", dtype="U8", shape=[256, 1], source=BaseTensor(name="s"),
                   encoding=Stored(), parts=[TensorPart(name="s.absmax", dtype="F32", shape=[8])]),
    ]
    plan = MergePlan(base="b", adapter="a", dtype="F32",
                     shards=[ShardPlan(filename="model.safetensors", tensors=entries)])
    plan.save(tmp_path / "plan.json")
    loaded = MergePlan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.fingerprint() == plan.fingerprint()
    got = loaded.shards[0].tensors
    assert [type(t.source) for t in got] == [type(t.source) for t in entries]
    assert [[type(op) for op in t.ops] for t in got] == [[type(op) for op in t.ops] for t in entries]
    assert [type(t.encoding) for t in got] == [type(t.encoding) for t in entries]
    assert got[3].row_shape == [32, 16] and got[3].find(Experts).part(2).expert == 3
    assert got[0].lora is None and got[1].lora == "q" and got[4].lora_bias == "b"
    assert got[0].from_adapter and not got[1].from_adapter
    assert [t.computes for t in got] == [True] * 6 + [False]


def test_staging_planned_by_the_previous_plan_version_starts_afresh(make_base, make_adapter,
                                                                     tmp_path):
    """A staging folder left by a run whose plan had the old (flag) shape is not resumed: the
    merge starts afresh and writes the same bytes as a clean run."""
    from helpers import read_tensors

    import mergeflow
    from mergeflow.pipeline.steps import prepare
    from mergeflow.spec import MergeSpec

    base = make_base("llama")
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj"])
    clean = tmp_path / "clean"
    mergeflow.merge(base, adapter, clean, dtype="float32")
    out = tmp_path / "out"
    prepared = prepare(MergeSpec(base=str(base), adapter=str(adapter), out=str(out),
                                 dtype="float32"))
    plan_path = tmp_path / prepared.plan_path
    old = json.loads(plan_path.read_text())
    old["version"] = 1
    for shard in old["shards"]:
        for t in shard["tensors"]:
            lora = next((op["module"] for op in t.pop("ops") if op["op"] == "lora"), None)
            t.pop("encoding")
            t.update(source=t["source"]["name"], from_adapter=False, lora=lora)
    plan_path.write_text(json.dumps(old))
    mergeflow.merge(base, adapter, out, dtype="float32")
    merged, reference = read_tensors(out), read_tensors(clean)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in merged)
