"""Several adapters of one base in one sweep (issue 25): ``mergeflow.merge_many`` and
``mergeflow merge --adapter A1 --adapter A2 ...``.

Route: in process for the batch and the refusal; the real CLI in a fresh interpreter for the
crash (SIGKILL at a fault point) and the rerun. CPU, float32 tiny Llama bases with several
shards, so the sweep interleaves shards of different outputs. Each batch output is compared
with a single merge of the same adapter: every shard's bytes, and the manifest's file list.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from builders import build_adapter, build_base
from helpers import run_cli

import mergeflow
from mergeflow.errors import InputError
from mergeflow.pipeline.many import output_folders

SHARD = "40KB"  # several output shards, so the sweep interleaves outputs


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A sharded base and three adapters of different kinds: plain LoRA, DoRA, and LoRA on the
    embedding and the head as well."""
    root = tmp_path_factory.mktemp("many")
    base = build_base(root / "base", "llama", max_shard_size="40KB")
    adapters = {
        "plain": build_adapter(base, root / "plain", seed=1, target_modules=["q_proj", "v_proj"]),
        "dora": build_adapter(base, root / "dora", seed=2, use_dora=True,
                              target_modules=["o_proj", "down_proj"]),
        "embed": build_adapter(base, root / "embed", seed=3,
                               target_modules=["q_proj", "embed_tokens", "lm_head"]),
    }
    return root, base, adapters


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_a_batch_writes_each_output_as_its_single_merge_does(batch, tmp_path):
    _, base, adapters = batch
    outputs = {tmp_path / "batch" / name: folder for name, folder in adapters.items()}
    fractions: list[float] = []
    reports = mergeflow.merge_many(base, outputs, max_shard_size=SHARD,
                                   on_progress=fractions.append)
    assert sorted(reports) == sorted(str(out) for out in outputs)
    shards = sum(len(_shards(out)) for out in outputs)
    assert len(_shards(next(iter(outputs)))) > 2  # the sweep interleaved several shards
    # one step per swept shard and per finished output, rising to the whole batch
    assert len(fractions) == shards + len(outputs) and fractions == sorted(fractions)
    assert fractions[-1] == 1.0 and fractions[0] == 1 / (shards + len(outputs))
    for out, adapter in outputs.items():
        single = tmp_path / "single" / out.name
        mergeflow.merge(base, adapter, single, max_shard_size=SHARD)
        assert _shards(out) == _shards(single), out.name
        ours = json.loads((out / "merge-manifest.json").read_text())["files"]
        theirs = json.loads((single / "merge-manifest.json").read_text())["files"]
        assert ours == theirs, out.name
    again = mergeflow.merge_many(base, outputs, max_shard_size=SHARD)
    assert {r.status for r in again.values()} == {"up-to-date"}


def test_a_bad_adapter_among_good_ones_is_named_and_nothing_is_written(batch, tmp_path):
    _, base, adapters = batch
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{ not json")
    outputs = {tmp_path / "out" / "plain": adapters["plain"], tmp_path / "out" / "bad": bad,
               tmp_path / "out" / "dora": adapters["dora"]}
    with pytest.raises(InputError, match=r"1 of 3 adapters refused, nothing written: .*bad"):
        mergeflow.merge_many(base, outputs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_output_names_collide_or_follow_the_adapters():
    assert output_folders("/o", ["/a/run-1", "hf://org/run-2@abc"]) == {
        "/o/run-1": "/a/run-1", "/o/run-2": "hf://org/run-2@abc"}
    # only an hf:// reference has a revision to drop; a local folder may hold an @
    assert output_folders("/o", ["/data/run@v2", "s3://b/sweep@3/"]) == {
        "/o/run@v2": "/data/run@v2", "/o/sweep@3": "s3://b/sweep@3/"}
    with pytest.raises(InputError, match="would both be written to /o/ckpt"):
        output_folders("/o", ["/a/ckpt", "/b/ckpt"])
    assert output_folders("/o", ["/a/ckpt", "/b/ckpt"], ["one", "two"]) == {
        "/o/one": "/a/ckpt", "/o/two": "/b/ckpt"}


def test_the_cli_batch_resumes_every_output_after_a_crash(batch, tmp_path):
    _, base, adapters = batch
    out = tmp_path / "cli"
    args = ["merge", "--base", str(base), "--out", str(out), "--max-shard-size", SHARD]
    for folder in adapters.values():
        args += ["--adapter", str(folder)]
    os.environ["MERGEFLOW_FAULT_AT"] = "after-shard-recorded:4"  # mid-sweep: SIGKILL
    try:
        crashed = run_cli(*args)
    finally:
        del os.environ["MERGEFLOW_FAULT_AT"]
    assert crashed.returncode != 0
    assert not any((out / name / "merge-manifest.json").exists() for name in adapters)
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    for name, folder in adapters.items():
        assert (out / name / "merge-manifest.json").is_file(), name
        single = tmp_path / "single" / name
        mergeflow.merge(base, folder, single, max_shard_size=SHARD)
        assert _shards(out / name) == _shards(single), name
    assert "resumed" in done.stdout or "shards" in done.stdout


def test_push_to_is_a_template_with_the_output_name(batch, tmp_path, monkeypatch):
    """Each output is published to the template's place for its name (moto's S3 server)."""
    from s3_server import aws_test_env, moto_s3, new_bucket

    from mergeflow.remote.fetch import s3_client

    _, base, adapters = batch
    outputs = {tmp_path / "pub" / name: adapters[name] for name in ("plain", "embed")}
    with aws_test_env(), moto_s3() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        client = s3_client(url)
        bucket = new_bucket(client)
        with pytest.raises(InputError, match=r"put \{name\} where each output's name goes"):
            mergeflow.merge_many(base, outputs, push_to=f"s3://{bucket}/merged")
        mergeflow.merge_many(base, outputs, push_to=f"s3://{bucket}/merged/{{name}}")
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    for name in ("plain", "embed"):
        assert f"merged/{name}/merge-manifest.json" in keys, sorted(keys)
