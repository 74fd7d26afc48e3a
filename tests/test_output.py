"""The output folder: its files, the manifest, reruns, overwrites and refused locations."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from builders import save_tokenizer
from helpers import age_files, load_json, read_tensors, sha256, snapshot, staging_leftovers
from huggingface_hub import ModelCard

import mergeflow
from mergeflow.errors import InputError, OutputError
from mergeflow.output.folder import TOKENIZER_FILES

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _tokenizer_files(folder):
    return {name for name in TOKENIZER_FILES if (folder / name).is_file()}


@pytest.fixture(scope="module")
def base(make_base):
    return make_base("llama")


@pytest.fixture(scope="module")
def adapter(base, make_adapter):
    return make_adapter(base, target_modules=TARGETS)


@pytest.fixture(scope="module")
def adapter_with_tokenizer(base, tmp_path_factory):
    """An adapter shipping its own tokenizer, distinguishable from the base's (smaller vocab)."""
    from builders import build_adapter

    folder = build_adapter(base, tmp_path_factory.mktemp("tok") / "adapter", seed=3,
                           target_modules=TARGETS, save_tokenizer_too=True)
    save_tokenizer(folder, 120)
    assert (folder / "tokenizer.json").read_bytes() != (base / "tokenizer.json").read_bytes()
    return folder


def test_output_folder_contents(base, adapter_with_tokenizer, tmp_path):
    out = tmp_path / "merged"
    report = mergeflow.merge(base, adapter_with_tokenizer, out, dtype="bfloat16")
    assert report.status == "merged"

    # config.json: every base field kept, dtype updated, no quantization_config.
    base_config, config = load_json(base / "config.json"), load_json(out / "config.json")
    assert base_config.get("dtype") == "float32"
    assert config["dtype"] == "bfloat16"
    if "torch_dtype" in base_config:
        assert config["torch_dtype"] == "bfloat16"
    assert "quantization_config" not in config
    for key, value in base_config.items():
        if key not in ("dtype", "torch_dtype"):
            assert config[key] == value, key
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(out).values())

    # generation_config.json copied byte for byte.
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()

    # Tokenizer: the adapter's files, byte-identical.
    names = _tokenizer_files(adapter_with_tokenizer)
    assert "tokenizer.json" in names
    assert _tokenizer_files(out) == names
    for name in names:
        assert (out / name).read_bytes() == (adapter_with_tokenizer / name).read_bytes(), name

    # README.md: a model card; the adapter names its base by a local path, which never goes
    # into the Hub metadata (tests/test_model_card.py covers the Hub ids).
    card = ModelCard.load(out / "README.md")
    adapter_config = load_json(adapter_with_tokenizer / "adapter_config.json")
    assert card.data.base_model is None
    assert adapter_config["base_model_name_or_path"] not in (out / "README.md").read_text()
    assert card.data.pipeline_tag == "text-generation"

    # The manifest lists every other file with its sha256 and size; no folders, no hidden files.
    manifest = load_json(out / "merge-manifest.json")
    files = sorted(p.name for p in out.iterdir())
    assert all((out / name).is_file() for name in files), files
    assert not [n for n in files if n.startswith(".")], files
    assert sorted(manifest["files"]) == sorted(set(files) - {"merge-manifest.json"})
    for name, entry in manifest["files"].items():
        assert entry["size"] == (out / name).stat().st_size, name
        assert entry["sha256"] == sha256(out / name), name

    # Nothing left beside the output (no staging folder, no old copy).
    assert staging_leftovers(out) == []


def test_base_tokenizer_is_used_when_the_adapter_has_none(base, adapter, tmp_path):
    out = tmp_path / "merged"
    mergeflow.merge(base, adapter, out)
    names = _tokenizer_files(base)
    assert names and _tokenizer_files(out) == names
    for name in names:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name


def test_explicit_tokenizer_folder(base, adapter, adapter_with_tokenizer, tmp_path):
    out = tmp_path / "merged"
    mergeflow.merge(base, adapter, out, tokenizer=str(adapter_with_tokenizer))
    assert (out / "tokenizer.json").read_bytes() == (adapter_with_tokenizer / "tokenizer.json").read_bytes()


def test_no_tokenizer_option(base, adapter, tmp_path):
    out = tmp_path / "merged"
    mergeflow.merge(base, adapter, out, no_tokenizer=True)
    assert _tokenizer_files(out) == set()
    assert (out / "config.json").is_file()


def test_rerun_is_up_to_date_and_touches_nothing(base, adapter, tmp_path):
    out = tmp_path / "merged"
    first = mergeflow.merge(base, adapter, out)
    age_files(out)
    before = snapshot(out)

    again = mergeflow.merge(base, adapter, out)

    assert again.status == "up-to-date"
    # the same report, but for how each run spent its time
    assert again.model_dump(exclude={"status", "timings"}) == \
        first.model_dump(exclude={"status", "timings"})
    assert set(first.timings) >= {"load", "merge", "verify", "publish"}
    assert set(again.timings) == {"load", "up to date"}
    assert snapshot(out) == before
    assert staging_leftovers(out) == []


def test_rerun_with_other_options_needs_overwrite(base, adapter, tmp_path):
    out = tmp_path / "merged"
    mergeflow.merge(base, adapter, out)
    age_files(out)
    before = snapshot(out)

    with pytest.raises(OutputError) as caught:
        mergeflow.merge(base, adapter, out, dtype="bfloat16")
    assert isinstance(caught.value, InputError)
    assert str(out) in str(caught.value) and "overwrite" in str(caught.value)
    assert snapshot(out) == before
    assert staging_leftovers(out) == []

    report = mergeflow.merge(base, adapter, out, dtype="bfloat16", overwrite=True)

    assert report.status == "merged"
    assert load_json(out / "config.json")["dtype"] == "bfloat16"
    assert load_json(out / "merge-manifest.json")["options"]["dtype"] == "BF16"
    assert all(t.dtype == torch.bfloat16 for t in read_tensors(out).values())
    assert staging_leftovers(out) == []
    # And the replaced output is itself up to date now.
    assert mergeflow.merge(base, adapter, out, dtype="bfloat16").status == "up-to-date"


def test_changed_adapter_is_not_up_to_date(base, adapter, tmp_path, make_adapter):
    out = tmp_path / "merged"
    mergeflow.merge(base, adapter, out)
    other = make_adapter(base, seed=7, target_modules=TARGETS)
    with pytest.raises(OutputError):
        mergeflow.merge(base, other, out)


def test_folder_with_foreign_files_is_refused_then_replaced(base, adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError):
        mergeflow.merge(base, adapter, out)
    assert (out / "notes.txt").read_text() == "mine"
    mergeflow.merge(base, adapter, out, overwrite=True)
    assert not (out / "notes.txt").exists()
    assert (out / "merge-manifest.json").is_file()


@pytest.mark.parametrize("where", ["inside-base", "inside-adapter", "is-base"])
def test_output_overlapping_an_input_is_refused(where, base, adapter, tmp_path):
    base = shutil.copytree(base, tmp_path / "base")  # copies: a broken check must not harm others
    adapter = shutil.copytree(adapter, tmp_path / "adapter")
    out = {"inside-base": base / "merged", "inside-adapter": adapter / "merged", "is-base": base}[where]
    before = snapshot(base), snapshot(adapter)
    with pytest.raises(OutputError):
        mergeflow.merge(base, adapter, out, overwrite=True)
    assert (snapshot(base), snapshot(adapter)) == before


def test_manifest_records_inputs(base, adapter, tmp_path):
    out = tmp_path / "merged"
    mergeflow.merge(base, adapter, out)
    inputs = load_json(out / "merge-manifest.json")["inputs"]["sha256"]
    assert inputs["base"]["model.safetensors"] == sha256(base / "model.safetensors")
    assert inputs["adapter"]["adapter_model.safetensors"] == sha256(adapter / "adapter_model.safetensors")
    assert json.loads((out / "merge-manifest.json").read_text())["plan_fingerprint"]


def test_non_finite_adapter_is_refused_and_nothing_is_published(base, adapter, tmp_path):
    """NaN in lora_B is only seen while merging (after planning): still an input error, and the
    output folder never appears. (The staging folder beside it is kept for a resumed run.)"""
    from safetensors.torch import load_file, save_file

    from mergeflow.errors import AdapterError

    broken = shutil.copytree(adapter, tmp_path / "adapter")
    state = load_file(str(broken / "adapter_model.safetensors"))
    key = sorted(k for k in state if k.endswith("mlp.down_proj.lora_B.weight"))[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "merged"

    with pytest.raises(AdapterError) as caught:
        mergeflow.merge(base, broken, out)

    assert isinstance(caught.value, InputError)
    module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    assert f"{module}.weight" in str(caught.value)
    assert not out.exists()
