"""The model card's Hub metadata (issue 16 item 4): ``base_model`` is a Hub repo id or absent,
never a local path; ``base_model_relation``, ``pipeline_tag`` and the base's license are set.

Each card is read back with ``huggingface_hub.ModelCard`` and its metadata checked as the Hub
checks it, offline: ``base_model`` passes ``huggingface_hub``'s own repo-id validation, the
relation is one the Hub knows, and no local path appears anywhere in the metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

import mergeflow
from mergeflow.output.folder import hub_base_model, hub_repo_id, pipeline_tag

#: The relations the Hub's model tree knows (docs: "Specifying a base model").
HUB_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


@pytest.fixture(scope="module")
def base(make_base):
    return make_base("llama")


@pytest.fixture(scope="module")
def adapter(base, make_adapter):
    return make_adapter(base, target_modules=["q_proj", "v_proj"])


def hub_metadata(out: Path, *local: Path) -> dict:
    """The card's metadata, checked as the Hub would check it."""
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    text = json.dumps(data)
    for path in local:
        assert str(path) not in text, f"a local path leaked into the card: {path}"
    if "base_model" in data:
        validate_repo_id(data["base_model"])
        assert data["base_model_relation"] in HUB_RELATIONS
    else:
        assert "base_model_relation" not in data
    assert isinstance(data.get("tags"), list)
    return data


def _adapter_naming(adapter: Path, tmp_path: Path, name: str | None) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = name
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def test_local_base_named_by_a_local_path_has_no_base_model(base, adapter, tmp_path):
    named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(named).is_absolute()  # the fixtures' adapters name their base by its path
    mergeflow.merge(base, adapter, tmp_path / "out")
    data = hub_metadata(tmp_path / "out", base, Path(named), tmp_path)
    assert "base_model" not in data
    assert data["pipeline_tag"] == "text-generation"
    assert data["library_name"] == "transformers"
    assert "license" not in data  # the base says nothing about its license


def test_adapter_naming_a_hub_repo_gives_base_model_and_relation(base, adapter, tmp_path):
    named = _adapter_naming(adapter, tmp_path, "acme/tiny-llama")
    mergeflow.merge(base, named, tmp_path / "out")
    data = hub_metadata(tmp_path / "out", base, tmp_path)
    assert data["base_model"] == "acme/tiny-llama"
    assert data["base_model_relation"] == "finetune"  # one parent: not the Hub's "merge"


def test_base_from_the_hf_cache_names_its_repo_and_carries_its_license(base, adapter, tmp_path):
    """A base read from the Hugging Face cache (where hf:// bases are fetched to): the cache
    folder's repo wins over what the adapter names; the base card's license is carried over."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama-4k" / "snapshots" / ("ab" * 20)
    shutil.copytree(base, snapshot)
    (snapshot / "README.md").write_text(
        "---\nlicense: other\nlicense_name: acme-license\n"
        "license_link: https://example.com/LICENSE\n---\n# tiny\n")
    named = _adapter_naming(adapter, tmp_path, "someone/else")
    mergeflow.merge(snapshot, named, tmp_path / "out")
    data = hub_metadata(tmp_path / "out", snapshot, tmp_path)
    assert data["base_model"] == "acme/tiny-llama-4k"
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other", "acme-license", "https://example.com/LICENSE")


def test_license_from_the_base_card_and_adapter_export_relation(base, adapter, tmp_path):
    local_base = tmp_path / "base"
    shutil.copytree(base, local_base)
    (local_base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    named = _adapter_naming(adapter, tmp_path, "acme/tiny-llama")
    mergeflow.merge(local_base, named, tmp_path / "out", save_method="lora")
    data = hub_metadata(tmp_path / "out", local_base, tmp_path)
    assert data["license"] == "apache-2.0" and "license_name" not in data
    assert data["base_model"] == "acme/tiny-llama"
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft"


@pytest.mark.parametrize(("ref", "expected"), [
    ("org/name", "org/name"), ("gpt2", "gpt2"), ("hf://org/name@v2", "org/name"),
    ("/abs/base", None), ("./base", None), ("~/base", None), ("s3://bucket/base", None),
    ("a/b/c", None), ("", None), (None, None),
])
def test_hub_repo_id(ref, expected):
    assert hub_repo_id(ref) == expected


def test_a_relative_base_path_is_judged_from_the_adapter_never_the_working_directory(
        tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "demo-out" / "base").mkdir(parents=True)
    adapter = project / "demo-out" / "adapter"
    adapter.mkdir()
    elsewhere = tmp_path / "worker"
    (elsewhere / "org" / "name").mkdir(parents=True)
    for cwd in (project, elsewhere):  # the trainer's folder, then a worker's somewhere else
        monkeypatch.chdir(cwd)
        assert hub_base_model(None, "demo-out/base", adapter) is None  # exists above the adapter
        assert hub_base_model(project / "demo-out" / "base", "demo-out/base") is None  # read
        assert hub_base_model(None, "acme/tiny", adapter) == "acme/tiny"
        assert hub_repo_id("org/name") == "org/name"  # whatever folders the cwd holds
    cache = tmp_path / "models--org--name" / "snapshots" / "abc"
    assert hub_base_model(cache, None) == "org/name"
    assert hub_base_model(tmp_path / "models--x--y" / "snapshots" / "abc", "/p") == "x/y"


def test_pipeline_tag_from_architectures():
    assert pipeline_tag({"architectures": ["Qwen2ForCausalLM"]}) == "text-generation"
    assert pipeline_tag({"architectures": ["BertModel"]}) is None
    assert pipeline_tag({}) is None
