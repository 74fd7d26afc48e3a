"""Bases saved as ``pytorch_model.bin`` (single or sharded) merge exactly like safetensors ones.

transformers 5 only writes safetensors, so the ``.bin`` bases are written as transformers 4's
``save_pretrained(safe_serialization=False)`` wrote them: ``torch.save`` of the state dict, sharded
by huggingface_hub's ``split_torch_state_dict_into_shards`` with a ``pytorch_model.bin.index.json``.
transformers 5 still loads them, which the tests check too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_json, logits_of, read_tensors, run_cli, sha256, weight_files

import mergeflow
from mergeflow.errors import CheckpointError, InputError
from mergeflow.model.checkpoint import Checkpoint

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-4  # float32 bases: merged and live logits agree to ~1e-6
CHANGED = 1e-2


def save_as_bin(source: Path, folder: Path, max_shard_size: str | None = None) -> Path:
    """Re-save a safetensors model folder as ``pytorch_model.bin`` (or shards + index)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("model"):
            shutil.copyfile(path, folder / path.name)
    state = read_tensors(source)
    if max_shard_size is None:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard_size)
    assert split.is_sharded
    for filename, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, folder / filename)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return folder


@pytest.fixture(scope="module")
def llama(make_base, make_adapter):
    base = make_base("llama")
    return base, make_adapter(base, target_modules=ATTN_MLP)


@pytest.fixture(scope="module")
def from_safetensors(llama, tmp_path_factory):
    """The same merge from the safetensors base, for byte comparisons."""
    base, adapter = llama
    out = tmp_path_factory.mktemp("st") / "merged"
    mergeflow.merge(base, adapter, out)
    return out


@pytest.mark.parametrize("max_shard_size", [None, "60KB"], ids=["single", "sharded"])
def test_bin_base_merges_to_the_live_adapter_and_the_safetensors_bytes(
        llama, from_safetensors, input_ids, tmp_path, max_shard_size):
    base, adapter = llama
    bin_base = save_as_bin(base, tmp_path / "bin-base", max_shard_size)
    bins = sorted(p.name for p in bin_base.glob("pytorch_model*.bin"))
    assert (len(bins) > 1) == (max_shard_size is not None) and not weight_files(bin_base)
    out = tmp_path / "merged"

    report = mergeflow.merge(bin_base, adapter, out)

    assert report.status == "merged" and report.lora_modules == 2 * len(ATTN_MLP)
    merged, live = logits_of(out, input_ids), logits_of(base, input_ids, adapter=adapter)
    torch.testing.assert_close(merged, live, atol=ATOL, rtol=0)
    assert (merged - logits_of(base, input_ids)).abs().max() > CHANGED
    # transformers itself reads the .bin base as the same model.
    torch.testing.assert_close(logits_of(bin_base, input_ids, adapter=adapter), live, atol=1e-6,
                               rtol=0)
    # Byte for byte the merge of the same model saved as safetensors.
    assert [p.name for p in weight_files(out)] == [p.name for p in weight_files(from_safetensors)]
    for ours, theirs in zip(weight_files(out), weight_files(from_safetensors), strict=True):
        assert sha256(ours) == sha256(theirs), ours.name
    # The manifest identifies the .bin inputs (and the index) by their sha256.
    inputs = load_json(out / "merge-manifest.json")["inputs"]["sha256"]["base"]
    indexed = [] if max_shard_size is None else ["pytorch_model.bin.index.json"]
    assert {n: d for n, d in inputs.items() if n.startswith("pytorch_model")} == \
        {n: sha256(bin_base / n) for n in [*bins, *indexed]}


def test_bf16_bin_base_with_tied_embeddings_sharing_a_storage(make_base, make_adapter, input_ids,
                                                              tmp_path):
    """A tied qwen2 base in bf16, its head saved as the same storage as the embedding (as
    torch.save keeps shared tensors): unchanged tensors are copied as stored bytes."""
    base = make_base("qwen2", dtype=torch.bfloat16)
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj", "up_proj"])
    bin_base = tmp_path / "bin-base"
    save_as_bin(base, bin_base)
    state = torch.load(bin_base / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # one storage, two names
    torch.save(state, bin_base / "pytorch_model.bin")
    ck = Checkpoint(bin_base)
    assert ck.tensors["lm_head.weight"].offset == ck.tensors["model.embed_tokens.weight"].offset
    out = tmp_path / "merged"

    mergeflow.merge(bin_base, adapter, out, dtype="bfloat16")

    reference = tmp_path / "reference"
    mergeflow.merge(base, adapter, reference, dtype="bfloat16")
    ours, theirs = read_tensors(out), read_tensors(reference)
    assert set(ours) == set(theirs)  # the tied head is not written twice
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    live = logits_of(base, input_ids, adapter=adapter)
    tolerance = 3e-2 * live.abs().max().item()  # bf16 rounding of the merged weights
    torch.testing.assert_close(logits_of(out, input_ids), live, atol=tolerance, rtol=0)


def test_views_at_storage_offsets_read_back_and_a_transposed_tensor_is_refused(tmp_path):
    buffer = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    state = {"whole": buffer, "top": buffer[:2], "rest": buffer[2:], "row": buffer[5],
             "scalar": torch.tensor(7.5, dtype=torch.float16), "empty": torch.empty(0, 3),
             "ints": torch.arange(5, dtype=torch.int64)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    ck = Checkpoint(tmp_path)
    assert ck.files == ["pytorch_model.bin"]
    assert {k: (v.shape, v.dtype) for k, v in ck.tensors.items()} == {
        "whole": ((6, 4), "F32"), "top": ((2, 4), "F32"), "rest": ((4, 4), "F32"),
        "row": ((4,), "F32"), "scalar": ((), "F16"), "empty": ((0, 3), "F32"), "ints": ((5,), "I64")}
    for name, tensor in state.items():
        assert torch.equal(ck.read(name), tensor), name
    assert torch.equal(ck.read_rows("rest", 1, 3), buffer[3:5])
    assert torch.equal(ck.read_row_set("whole", [0, 2, 3, 5]), buffer[[0, 2, 3, 5]])
    assert {k: v for k, v in ck.iter_tensors(["top", "ints"])}.keys() == {"top", "ints"}
    assert torch.equal(ck.read_many(["row", "top"])["row"], buffer[5])

    torch.save({**state, "transposed": buffer.t()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: tensor 'transposed': is stored "
                                              r"non-contiguously.*save_pretrained"):
        Checkpoint(tmp_path)


def test_safetensors_wins_when_both_formats_are_present(llama, tmp_path):
    base, _ = llama
    both = tmp_path / "both"
    shutil.copytree(base, both)
    torch.save({"unrelated.weight": torch.zeros(2, 2)}, both / "pytorch_model.bin")
    ck = Checkpoint(both)
    assert ck.files == ["model.safetensors"] and "unrelated.weight" not in ck


def _command_in(message: str) -> str:
    """The python -c program a refusal message proposes."""
    found = re.search(r'python -c "([^"]+)"', message)
    assert found, message
    return found.group(1)


def test_legacy_pickle_is_refused_with_a_conversion_that_works(llama, input_ids, tmp_path):
    base, adapter = llama
    legacy = tmp_path / "legacy"
    save_as_bin(base, legacy)
    torch.save(read_tensors(base), legacy / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)

    with pytest.raises(CheckpointError) as refused:
        mergeflow.merge(legacy, adapter, tmp_path / "out")

    message = str(refused.value)
    assert isinstance(refused.value, InputError)
    assert f"{legacy / 'pytorch_model.bin'}: a legacy (non-zip) PyTorch pickle" in message
    assert not (tmp_path / "out").exists()
    # The command it proposes converts the folder; the converted base then merges.
    subprocess.run([sys.executable, "-c", _command_in(message)], check=True, timeout=300,
                   capture_output=True)
    converted = Path(f"{legacy}-safetensors")
    out = tmp_path / "merged"
    mergeflow.merge(converted, adapter, out)
    torch.testing.assert_close(logits_of(out, input_ids),
                               logits_of(base, input_ids, adapter=adapter), atol=ATOL, rtol=0)


class _Payload:
    """Pickles as a call of ``os.system`` that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_needing_a_forbidden_global_is_refused_without_running_it(llama, tmp_path):
    base, adapter = llama
    evil = tmp_path / "evil"
    save_as_bin(base, evil)
    marker = tmp_path / "it-ran"
    state = read_tensors(base)
    state["model.norm.weight"] = _Payload(marker)
    torch.save(state, evil / "pytorch_model.bin")

    with pytest.raises(CheckpointError) as refused:
        mergeflow.merge(evil, adapter, tmp_path / "out")

    message = str(refused.value)
    assert f"{evil / 'pytorch_model.bin'}: its pickle needs posix.system" in message
    assert "weights_only=True" in message and "If you trust the file's source" in message
    assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "out").exists()
    # The CLI, in a fresh process: exit 2 (refused while planning), the file named, nothing run.
    done = run_cli("merge", "--base", str(evil), "--adapter", str(adapter),
                   "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert str(evil / "pytorch_model.bin") in done.stderr and "posix.system" in done.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("damage", "words"), [
    (lambda p: p.write_bytes(p.read_bytes()[:-200]), "not a PyTorch checkpoint"),
    (lambda p: p.write_bytes(b"\x00junk" * 40), "not a PyTorch checkpoint"),
])
def test_a_damaged_bin_is_refused_naming_it(llama, tmp_path, damage, words):
    base, _ = llama
    folder = save_as_bin(base, tmp_path / "bin-base")
    damage(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=rf"pytorch_model\.bin: .*{words}"):
        Checkpoint(folder)


def test_a_sharded_bin_index_naming_a_missing_shard_is_refused(llama, tmp_path):
    base, _ = llama
    folder = save_as_bin(base, tmp_path / "bin-base", "60KB")
    shard = sorted(folder.glob("pytorch_model-*.bin"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard.name)}: file not found"):
        Checkpoint(folder)


# -- sources: a .bin base from S3 or the Hugging Face cache ----------------------------------------


def _bin_files(llama, tmp_path: Path, max_shard_size: str | None = "60KB") -> dict[str, bytes]:
    base, _ = llama
    folder = save_as_bin(base, tmp_path / "bin-files", max_shard_size)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_s3_fetches_bin_weights_only_where_no_safetensors_are(llama, tmp_path, monkeypatch):
    from s3_server import aws_test_env, moto_s3, new_bucket

    from mergeflow.remote.fetch import resolve_source, s3_client

    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    files = _bin_files(llama, tmp_path)
    both = {**files, "model.safetensors": (llama[0] / "model.safetensors").read_bytes()}
    with aws_test_env(), moto_s3() as url:
        client = s3_client(url)
        bucket = new_bucket(client)
        for prefix, content in (("bin-only", files), ("both", both)):
            for name, data in content.items():
                client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)
        bin_only = resolve_source(f"s3://{bucket}/bin-only", client=client)
        with_both = resolve_source(f"s3://{bucket}/both", client=client)

    mirrored = {p.name for p in bin_only.iterdir() if not p.name.startswith(".")}
    assert mirrored == set(files)
    assert Checkpoint(bin_only).files == sorted(n for n in files if n.endswith(".bin"))
    fetched = {p.name for p in with_both.iterdir() if not p.name.startswith(".")}
    assert "model.safetensors" in fetched and not any(n.startswith("pytorch_model") for n in fetched)


def test_hf_cache_bin_base_merges(llama, input_ids, tmp_path, monkeypatch):
    from test_sources import write_hf_cache

    base, adapter = llama
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    write_hf_cache(cache, "org/old-llama", _bin_files(llama, tmp_path, None), "a" * 40)
    out = tmp_path / "merged"

    mergeflow.merge("hf://org/old-llama", adapter, out)

    torch.testing.assert_close(logits_of(out, input_ids),
                               logits_of(base, input_ids, adapter=adapter), atol=ATOL, rtol=0)
