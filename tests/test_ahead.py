"""Merging ahead of the plan while a new base's layout is learnt (``mergeflow.pipeline.ahead``):
a shard is kept only when the real plan plans it the same way, the output is byte for byte the
one a merge without it writes, and nothing is left behind when planning then refuses.

Route: ``mergeflow.pipeline.prepare(spec, ahead=True)`` then ``run_local``, as ``mergeflow.merge``
and a local ``mergeflow merge`` run them, each merge in a fresh interpreter (the layout's child
is a fork, which needs a process with one thread) with its own empty ``MERGEFLOW_CACHE``, so the
layout is learnt every time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import load_json, run_cli, run_python, sha256, weight_files

MERGE = """
    import json, sys
    from mergeflow.pipeline import prepare, run_local
    from mergeflow.spec import MergeSpec

    base, adapter, out, ahead = sys.argv[1:5]
    spec = MergeSpec(base=base, adapter=adapter, out=out, max_shard_size="60KB")
    prepared = prepare(spec, ahead=ahead == "1")
    report = run_local(prepared, spec)
    print(json.dumps({"ahead": [r.filename for r in prepared.written_ahead],
                      "shards": report.shards, "status": report.status}))
"""


def _merge(base: Path, adapter: Path, out: Path, cache: Path, ahead: bool) -> dict:
    """One merge in a fresh interpreter with an empty cache; what it printed."""
    code = MERGE.replace("sys.argv[1:5]", repr([str(base), str(adapter), str(out),
                                                 "1" if ahead else "0"]))
    return run_python(code, {"MERGEFLOW_CACHE": str(cache)})


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file the output holds but its manifest (which records this run's
    timings)."""
    return {p.name: sha256(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "merge-manifest.json"}


@pytest.mark.parametrize("arch, kept", [("llama", True), ("gpt2", False)])
def test_shards_merged_ahead_are_kept_only_when_planned_alike(arch, kept, make_base,
                                                              make_adapter, tmp_path):
    """Llama: config.json alone plans it as the model's own code does, so shards merged ahead
    are kept. GPT-2: its ``Conv1D`` weights are stored transposed, which only the model's code
    says, so no shard planned ahead matches and none is kept. Either way the output is the one
    a merge without it writes."""
    base = make_base(arch, max_shard_size="60KB")
    adapter = make_adapter(base, target_modules="all-linear")
    with_ahead = _merge(base, adapter, tmp_path / "ahead", tmp_path / "cache-a", ahead=True)
    without = _merge(base, adapter, tmp_path / "plain", tmp_path / "cache-b", ahead=False)
    assert with_ahead["status"] == without["status"] == "merged"
    assert without["ahead"] == []
    if kept:
        assert with_ahead["ahead"], "the layout's child takes seconds: some shard goes ahead"
    else:
        assert with_ahead["ahead"] == []
    assert set(with_ahead["ahead"]) <= {p.name for p in weight_files(tmp_path / "ahead")}
    assert _files(tmp_path / "ahead") == _files(tmp_path / "plain")
    manifest = load_json(tmp_path / "ahead" / "merge-manifest.json")
    assert {p.name for p in weight_files(tmp_path / "ahead")} <= set(manifest["files"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ahead", "cache-a", "cache-b", "plain"]


def test_a_refused_merge_leaves_nothing_of_what_went_ahead(make_base, make_adapter, tmp_path,
                                                           monkeypatch):
    """An adapter holding NaN is refused after planning (exit 2): the shards merged ahead
    meanwhile are deleted with their folder, and the output's parent is as it was."""
    import torch
    from safetensors.torch import load_file, save_file

    base = make_base("llama", max_shard_size="60KB")
    adapter = shutil.copytree(make_adapter(base, target_modules="all-linear"),
                              tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(n for n in tensors if n.endswith("lora_B.weight"))[-1]  # the last shard's
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights)
    parent = tmp_path / "outputs"
    parent.mkdir()
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))  # the layout is learnt
    result = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out",
                     str(parent / "merged"), "--max-shard-size", "60KB")
    assert result.returncode == 2, result.stderr
    assert "NaN" in result.stderr and "Traceback" not in result.stderr
    assert list(parent.iterdir()) == []
    assert torch.isnan(load_file(weights)[name]).any()  # the input is untouched


def test_an_interrupted_merge_ahead_is_cleared_by_the_next_merge(make_base, make_adapter,
                                                                  tmp_path):
    """A folder of shards merged ahead that a killed run left behind is not part of any output:
    the next merge into the same place removes it."""
    base = make_base("llama", max_shard_size="60KB")
    adapter = make_adapter(base, target_modules="all-linear")
    out = tmp_path / "merged"
    left = tmp_path / ".merged.mergeflow-ahead"
    left.mkdir()
    (left / "model-00001-of-00009.safetensors").write_bytes(b"half a shard")
    got = _merge(base, adapter, out, tmp_path / "cache", ahead=False)
    assert got["status"] == "merged"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "merged"]
    assert json.loads((out / "merge-manifest.json").read_text())["files"]
