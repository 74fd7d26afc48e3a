"""Nothing leaves where it must not: real symlinks out of an input folder are refused, a real
stray file in staging is never published, and a real rotted output is rebuilt, never taken as
done nor uploaded (the upload goes to moto's S3 server over HTTP).

Route: the CLI in a child process for the refusal (exit code and stderr), ``mergeflow.merge`` and
the pipeline's steps in process for the rest; the environment each needs is set here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli
from s3_server import aws_test_env, moto_s3, new_bucket

import mergeflow
from mergeflow import pipeline
from mergeflow.output.folder import MANIFEST
from mergeflow.remote.fetch import s3_client
from mergeflow.spec import MergeSpec
from mergeflow.storage.staging import Staging


@pytest.fixture(scope="module")
def inputs(make_base, make_adapter):
    base = make_base("llama", max_shard_size="60KB")
    return base, make_adapter(base, target_modules=["q_proj", "v_proj"], save_tokenizer_too=True)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


@pytest.mark.parametrize("name, target", [("merges.txt", "/etc/passwd"),
                                          ("vocab.txt", "/proc/self/environ")])
def test_a_symlink_out_of_the_adapter_folder_is_refused_naming_it(inputs, tmp_path, name, target):
    base, adapter = inputs
    adapter = _copy(adapter, tmp_path / "adapter")
    (adapter / name).symlink_to(target)
    out = tmp_path / "out"
    proc = run_cli("merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(adapter / name) in lines[0] and f"a symlink to {target}" in lines[0]
    assert not out.exists() and not Staging.for_output(out).folder.exists()


def test_a_symlinked_base_shard_outside_its_folder_is_refused(inputs, tmp_path):
    base, adapter = inputs
    elsewhere = _copy(base, tmp_path / "elsewhere")
    linked = tmp_path / "base"
    linked.mkdir()
    for path in elsewhere.iterdir():
        (linked / path.name).symlink_to(path)
    with pytest.raises(mergeflow.InputError, match="outside"):
        mergeflow.merge(linked, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_links_inside_the_folder_and_the_hf_cache_layout_are_followed(inputs, tmp_path):
    base, adapter = inputs
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(base.iterdir())):
        shutil.copyfile(path, blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    inside = _copy(adapter, tmp_path / "adapter")
    (inside / "tokenizer.json").rename(inside / "tok.json")
    (inside / "tokenizer.json").symlink_to("tok.json")  # a link within its own folder
    report = mergeflow.merge(snapshot, inside, tmp_path / "out")
    reference = mergeflow.merge(base, adapter, tmp_path / "reference")
    assert report.status == reference.status == "merged"
    for path in (tmp_path / "reference").iterdir():
        if path.name not in ("README.md", MANIFEST):  # these name the inputs
            assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_stray_file_in_staging_is_never_published_nor_listed(inputs, tmp_path):
    base, adapter = inputs
    spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "out"))
    prepared = pipeline.prepare(spec)
    staging = Path(prepared.staging)
    (staging / "stolen.txt").write_text("secret")  # dropped between a kill and the rerun
    (staging / "loot").mkdir()
    pipeline.run_local(prepared, spec)
    out = tmp_path / "out"
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert not (out / "stolen.txt").exists() and not (out / "loot").exists()
    assert "stolen.txt" not in files and set(files) == {p.name for p in out.iterdir()} - {MANIFEST}


def test_a_file_dropped_after_finalize_is_not_published(inputs, tmp_path):
    base, adapter = inputs
    spec = MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "out"))
    prepared = pipeline.prepare(spec)
    results = pipeline.run_shards(prepared, spec)
    pipeline.finalize(prepared, results)
    (Path(prepared.staging) / "late.txt").write_text("secret")
    pipeline.publish_output(prepared)
    out = tmp_path / "out"
    assert (out / MANIFEST).is_file() and not (out / "late.txt").exists()


def test_a_truncated_output_is_rebuilt_not_taken_as_done(inputs, tmp_path):
    base, adapter = inputs
    out = tmp_path / "out"
    mergeflow.merge(base, adapter, out, max_shard_size="40KB")
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    report = mergeflow.merge(base, adapter, out, max_shard_size="40KB")
    assert report.status == "merged"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good


@pytest.fixture()
def s3(monkeypatch):
    with aws_test_env(), moto_s3() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        yield s3_client(url)


def test_a_rotted_output_is_rebuilt_before_an_upload_never_shipped(inputs, tmp_path, s3):
    base, adapter = inputs
    out, bucket = tmp_path / "out", new_bucket(s3, "models")
    mergeflow.merge(base, adapter, out, max_shard_size="40KB")
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    shard = sorted(out.glob("*.safetensors"))[-1]
    rotted = bytearray(shard.read_bytes())
    rotted[-3] ^= 0xFF  # same size: only a hash sees it
    shard.write_bytes(bytes(rotted))
    assert mergeflow.merge(base, adapter, out, max_shard_size="40KB").status == "up-to-date"
    report = mergeflow.merge(base, adapter, out, max_shard_size="40KB", push_to=f"s3://{bucket}/m")
    assert report.status == "merged"  # rebuilt: the rot was seen before anything was shipped
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="m/")["Contents"]
    shipped = {o["Key"][2:]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
               for o in listed}
    assert shipped == good == {p.name: p.read_bytes() for p in out.iterdir()}
