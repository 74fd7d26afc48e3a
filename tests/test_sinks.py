"""Sinks: publishing a finished folder to S3 (moto's server over real HTTP) and to the Hugging Face
Hub (through RecordingHfApi, the one fake: the Hub is unreachable from tests)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from s3_server import SECRET_KEY, FlakyProxy, OperationLog, aws_test_env, moto_s3, new_bucket

from mergeflow.errors import SinkError, TransientError
from mergeflow.output.folder import MANIFEST
from mergeflow.remote.fetch import resolve_source, s3_client
from mergeflow.remote.publish import (
    HfPublisher,
    S3Publisher,
    finished_files,
    open_publisher,
    publish,
    publish_file,
)

MiB = 2**20
BIG = "model-00001-of-00002.safetensors"
SMALL_SHARD = "model-00002-of-00002.safetensors"
WRITES = ("PutObject", "CreateMultipartUpload")


class RecordingHfApi:
    """A fake of ``huggingface_hub.HfApi`` for the unreachable Hugging Face Hub: it records the
    calls Mergeflow makes (``create_repo``, ``create_branch``, ``preupload_lfs_files``,
    ``create_commit``) and can raise a given error from one of them. Nothing is uploaded."""

    def __init__(self, fail: dict[str, Exception] | None = None) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail = fail or {}

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", (repo_id,), kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, **kwargs):
        self._record("create_branch", (repo_id,), kwargs)

    def preupload_lfs_files(self, repo_id, additions, **kwargs):
        self._record("preupload_lfs_files", (repo_id, [a.path_in_repo for a in additions]), kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        self._record("create_commit", (repo_id, [op.path_in_repo for op in operations]), kwargs)
        url = f"https://huggingface.co/{repo_id}/commit/abc"
        pr = f"https://huggingface.co/{repo_id}/discussions/1" if kwargs.get("create_pr") else None
        return SimpleNamespace(commit_url=url, pr_url=pr, oid="abc")

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for n, args, kwargs in self.calls if n == name]


def write_finished_folder(folder: Path, files: dict[str, bytes]) -> Path:
    """A folder shaped like a finished merge: the files and a manifest of their sizes and sha256."""
    folder.mkdir(parents=True)
    entries = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        entries[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": "mergeflow-manifest/1", "files": entries, "report": {}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


def model_files() -> dict[str, bytes]:
    return {
        BIG: os.urandom(12 * MiB),
        SMALL_SHARD: os.urandom(100_000),
        "model.safetensors.index.json": b'{"metadata": {}, "weight_map": {}}',
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        "README.md": b"# Merged model\n",
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished output folder with a 12 MiB shard (read-only: copy before changing it)."""
    return write_finished_folder(tmp_path_factory.mktemp("finished") / "out", model_files())


@pytest.fixture(scope="module")
def s3_endpoint():
    with aws_test_env(), moto_s3() as url:
        yield url


@pytest.fixture(scope="module")
def s3_module_client(s3_endpoint):
    """One client for the module (building a boto3 client costs about a second)."""
    return s3_client(s3_endpoint)


@pytest.fixture
def s3(s3_module_client, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "mergeflow-cache"))
    return s3_module_client, new_bucket(s3_module_client)


@pytest.fixture
def ops(s3):
    """Records the S3 operations of the module client during one test."""
    log = OperationLog(s3[0])
    yield log
    log.close()


def small_parts() -> dict:
    return {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB, "max_concurrency": 2}


def read_object(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


# --------------------------------------------------------------------------- S3


def test_s3_publish_multipart_checksums_and_manifest_last(s3, finished, ops):
    client, bucket = s3
    ops.clear()
    result = publish(finished, f"s3://{bucket}/models/m1", client=client, **small_parts())

    files = finished_files(finished)
    assert sorted(result.uploaded) == sorted([*files, MANIFEST]) and result.skipped == []
    assert result.bytes_sent == sum(e["size"] for e in files.values()) + (finished / MANIFEST).stat().st_size
    assert ops.names(*WRITES)[-1] == f"models/m1/{MANIFEST}"
    assert ops.names("CreateMultipartUpload") == [f"models/m1/{BIG}"]
    assert ops.count("UploadPart") == 3
    for params in ops.params:
        if "UploadId" not in params and ("Body" in params or "Metadata" in params):
            assert params["ChecksumAlgorithm"] == "SHA256"

    for name, entry in files.items():
        key = f"models/m1/{name}"
        assert read_object(client, bucket, key) == (finished / name).read_bytes()
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        assert head["Metadata"]["sha256"] == entry["sha256"]
        if name != BIG:  # single-part: S3's own SHA256 is the file's
            assert base64.b64decode(head["ChecksumSHA256"]).hex() == entry["sha256"]


def test_s3_republish_sends_nothing(s3, finished, ops):
    client, bucket = s3
    dest = f"s3://{bucket}/m"
    publish(finished, dest, client=client, **small_parts())
    ops.clear()
    again = publish(finished, dest, client=client, **small_parts())
    assert again.uploaded == [] and again.bytes_sent == 0
    assert len(again.skipped) == len(finished_files(finished)) + 1
    assert ops.count(*WRITES, "DeleteObject") == 0


def test_s3_resume_sends_only_what_is_missing(s3, finished, ops):
    client, bucket = s3
    dest = f"s3://{bucket}/m"
    publish(finished, dest, client=client, **small_parts())
    for name in (SMALL_SHARD, MANIFEST):  # as if the first run died before these
        client.delete_object(Bucket=bucket, Key=f"m/{name}")
    ops.clear()
    result = publish(finished, dest, client=client, **small_parts())
    assert result.uploaded == [SMALL_SHARD, MANIFEST]
    assert ops.names(*WRITES) == [f"m/{SMALL_SHARD}", f"m/{MANIFEST}"]


def test_s3_changed_model_drops_the_old_manifest_first(s3, finished, tmp_path, ops):
    client, bucket = s3
    dest = f"s3://{bucket}/m"
    publish(finished, dest, client=client, **small_parts())
    files = {p.name: p.read_bytes() for p in finished.iterdir() if p.name != MANIFEST}
    files["config.json"] = b'{"model_type": "llama", "changed": true}'
    changed = write_finished_folder(tmp_path / "changed", files)
    ops.clear()
    result = publish(changed, dest, client=client, **small_parts())
    assert result.uploaded == ["config.json", MANIFEST]
    assert [c for c in ops.calls if c[0] in (*WRITES, "DeleteObject")] == [
        ("DeleteObject", f"m/{MANIFEST}"), ("PutObject", "m/config.json"), ("PutObject", f"m/{MANIFEST}")]
    assert read_object(client, bucket, f"m/{MANIFEST}") == (changed / MANIFEST).read_bytes()


def test_s3_low_disk_put_each_shard_then_finish_elsewhere(s3, finished, tmp_path):
    client, bucket = s3
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    files = finished_files(work)
    dest = f"s3://{bucket}/low"
    for name in (BIG, SMALL_SHARD):  # each shard as it is written, then deleted locally
        result = publish_file(work / name, dest, sha256=files[name]["sha256"], client=client, **small_parts())
        assert result.uploaded == [name]
        (work / name).unlink()
    small = [work / n for n in files if not n.endswith(".safetensors")]
    result = open_publisher(dest, client=client).finish(small, work / MANIFEST)
    assert MANIFEST in result.uploaded and {BIG, SMALL_SHARD} <= set(result.skipped)
    assert read_object(client, bucket, f"low/{BIG}") == (finished / BIG).read_bytes()


def test_s3_finish_refuses_a_missing_shard(s3, finished):
    client, bucket = s3
    small = [finished / n for n in finished_files(finished) if not n.endswith(".safetensors")]
    publisher = S3Publisher(f"s3://{bucket}/partial", client=client)
    with pytest.raises(SinkError, match=rf"partial/{BIG}: not published"):
        publisher.finish(small, finished / MANIFEST)
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=f"partial/{MANIFEST}")


def test_s3_server_side_encryption(s3, finished):
    client, bucket = s3
    publish(finished, f"s3://{bucket}/enc", client=client, sse="aws:kms", kms_key_id="alias/mergeflow")
    head = client.head_object(Bucket=bucket, Key=f"enc/{BIG}")
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == "alias/mergeflow"


def test_s3_bad_options_are_refused(s3):
    client, bucket = s3
    with pytest.raises(SinkError, match="sse 'kms'"):
        S3Publisher(f"s3://{bucket}/x", client=client, sse="kms")
    with pytest.raises(SinkError, match="kms_key_id needs"):
        S3Publisher(f"s3://{bucket}/x", client=client, kms_key_id="k")
    with pytest.raises(SinkError, match="5 MiB"):
        S3Publisher(f"s3://{bucket}/x", client=client, part_size=MiB)
    with pytest.raises(SinkError, match="private do not apply to s3://"):
        open_publisher(f"s3://{bucket}/x", client=client, private=True)


def test_s3_missing_bucket_is_permanent_and_leaks_no_secret(s3_module_client, finished, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SinkError, match=r"s3://no-such-bucket-mf/m/.*the bucket does not exist") as info:
        publish(finished, "s3://no-such-bucket-mf/m", client=s3_module_client)
    assert SECRET_KEY not in str(info.value) and SECRET_KEY not in caplog.text


def test_s3_throttling_survived_by_retries(s3, finished):
    client, bucket = s3
    with FlakyProxy(client.meta.endpoint_url, fail=2) as proxy:
        flaky = s3_client(proxy.url, max_attempts=3)
        publish(finished, f"s3://{bucket}/flaky", client=flaky, **small_parts())
    assert proxy.failed == 2
    assert read_object(client, bucket, f"flaky/{BIG}") == (finished / BIG).read_bytes()


def test_s3_throttling_beyond_retries_is_transient(s3, finished, caplog):
    caplog.set_level(logging.DEBUG)
    client, bucket = s3
    with FlakyProxy(client.meta.endpoint_url, fail=1000) as proxy:
        flaky = s3_client(proxy.url, max_attempts=1)
        with pytest.raises(TransientError, match="HTTP 503") as info:
            publish(finished, f"s3://{bucket}/flaky", client=flaky)
    assert SECRET_KEY not in str(info.value) and SECRET_KEY not in caplog.text


def test_unfinished_folders_are_refused(tmp_path, finished):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SinkError, match=f"no readable {MANIFEST}"):
        publish(tmp_path / "empty", "s3://bucket/x")
    broken = tmp_path / "broken"
    shutil.copytree(finished, broken)
    (broken / SMALL_SHARD).write_bytes(b"truncated")
    with pytest.raises(SinkError, match=f"{SMALL_SHARD}: missing or not the size"):
        publish(broken, "s3://bucket/x")


def test_unknown_destination_is_refused(finished):
    with pytest.raises(SinkError, match="unsupported destination"):
        publish(finished, "/tmp/elsewhere")


# --------------------------------------------------------------------------- Hugging Face Hub


def test_hf_publish_is_one_commit(finished):
    api = RecordingHfApi()
    result = publish(finished, "hf://org/merged", api=api, private=True, token="hf_tok",
                     commit_message="Merge run 7")
    assert [name for name, _, _ in api.calls] == [
        "create_repo", "preupload_lfs_files", "preupload_lfs_files", "create_commit"]
    (repo_id,), kwargs = api.named("create_repo")[0]
    assert repo_id == "org/merged" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert kwargs["token"] == "hf_tok"
    assert [args[1] for args, _ in api.named("preupload_lfs_files")] == [[BIG], [SMALL_SHARD]]
    ((repo_id, names), kwargs), = api.named("create_commit")
    assert sorted(names) == sorted([*finished_files(finished), MANIFEST]) and names[-1] == MANIFEST
    assert kwargs["commit_message"] == "Merge run 7" and kwargs["revision"] is None
    assert not kwargs["create_pr"]
    assert result.url == "https://huggingface.co/org/merged/commit/abc"


@pytest.mark.parametrize(("dest", "options"), [
    ("hf://org/merged", {"revision": "exp-1", "create_pr": True}),
    ("hf://org/merged@exp-1", {"create_pr": True}),
])
def test_hf_branch_and_pull_request(finished, dest, options):
    api = RecordingHfApi()
    result = publish(finished, dest, api=api, **options)
    ((_repo,), kwargs), = api.named("create_branch")
    assert kwargs["branch"] == "exp-1" and kwargs["exist_ok"] is True
    (_, kwargs), = api.named("create_commit")
    assert kwargs["revision"] == "exp-1" and kwargs["create_pr"] is True
    assert all(kw["revision"] == "exp-1" for _, kw in api.named("preupload_lfs_files"))
    assert result.url.endswith("/discussions/1")


def test_hf_low_disk_put_then_delete_then_finish(finished, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    files = finished_files(work)
    api = RecordingHfApi()
    publisher = open_publisher("hf://org/merged", api=api)
    for name in (BIG, SMALL_SHARD):
        publisher.put(work / name, files[name]["sha256"], files[name]["size"])
        (work / name).unlink()
    small = [work / n for n in files if not n.endswith(".safetensors")]
    publisher.finish(small, work / MANIFEST)
    ((_, names), _), = api.named("create_commit")
    assert set(names) == {*files, MANIFEST}


def test_hf_refuses_a_file_that_is_not_the_manifests(finished):
    publisher = HfPublisher("hf://org/merged", api=RecordingHfApi())
    with pytest.raises(SinkError, match="sha256 differs from the manifest"):
        publisher.put(finished / BIG, "0" * 64, (finished / BIG).stat().st_size)


def test_hf_finish_refuses_missing_files(finished):
    api = RecordingHfApi()
    small = [finished / n for n in finished_files(finished) if not n.endswith(".safetensors")]
    with pytest.raises(SinkError, match=f"{BIG}, {SMALL_SHARD} listed in the manifest but not published"):
        HfPublisher("hf://org/merged", api=api).finish(small, finished / MANIFEST)
    assert api.named("create_commit") == []


def test_publish_file_to_hf_needs_a_publisher(finished):
    with pytest.raises(SinkError, match="open_publisher"):
        publish_file(finished / BIG, "hf://org/merged")


def _http_error(status: int, message: str):
    httpx2 = pytest.importorskip("httpx2")
    from huggingface_hub.errors import HfHubHTTPError

    response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/x"))
    return HfHubHTTPError(message, response=response)


def test_hf_errors_are_sorted_and_leak_no_token(finished, caplog):
    caplog.set_level(logging.DEBUG)
    token = "hf_SECRETtoken_abcdef123"
    api = RecordingHfApi(fail={"create_commit": _http_error(503, "Service Unavailable")})
    with pytest.raises(TransientError, match="HTTP 503") as info:
        publish(finished, "hf://org/merged", api=api, token=token)
    api = RecordingHfApi(fail={"create_repo": _http_error(403, f"forbidden for token {token}")})
    with pytest.raises(SinkError, match="HF_TOKEN to a token with write access") as info2:
        publish(finished, "hf://org/merged", api=api, token=token)
    for text in (str(info.value), str(info2.value), caplog.text):
        assert token not in text


# --------------------------------------------------------------------------- end to end


def test_real_merge_from_s3_published_to_s3(s3, make_base, make_adapter, tmp_path):
    """Base and adapter come from S3, the merge runs on the cached copies, the output goes back to
    S3 and resolves again from there with the same manifest."""
    import mergeflow

    client, bucket = s3
    base, adapter = make_base("llama"), make_adapter(make_base("llama"))
    for prefix, folder in (("in/base", base), ("in/adapter", adapter)):
        for path in folder.iterdir():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    local_base = resolve_source(f"s3://{bucket}/in/base", client=client)
    local_adapter = resolve_source(f"s3://{bucket}/in/adapter", client=client)
    out = tmp_path / "merged"
    mergeflow.merge(local_base, local_adapter, out)

    result = publish(out, f"s3://{bucket}/out/merged", client=client)
    assert result.uploaded[-1] == MANIFEST
    back = resolve_source(f"s3://{bucket}/out/merged", client=client, allow_patterns=None)
    assert (back / MANIFEST).read_bytes() == (out / MANIFEST).read_bytes()
    assert finished_files(back) == finished_files(out)


# --------------------------------------------------------------------------- after publishing


def test_a_destination_failing_after_out_was_published_says_what_is_where(
        s3, s3_endpoint, make_base, make_adapter, tmp_path, monkeypatch):
    """Exit codes follow the phase (issue 15): a SinkError from --push-to after --out was
    published is no refusal of bad input: it is an UploadError (exit 1) that says --out holds
    the finished merge and the destination does not."""
    import mergeflow
    from mergeflow.errors import InputError, UploadError

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    base = make_base("llama")
    adapter = make_adapter(base)
    out, dest = tmp_path / "merged", "s3://no-such-bucket-mf/m"
    with pytest.raises(UploadError) as caught:
        mergeflow.merge(base, adapter, out, push_to=dest)
    message = str(caught.value)
    assert not isinstance(caught.value, InputError)
    assert isinstance(caught.value.__cause__, SinkError)
    assert message.startswith(f"{out} is published and holds the finished merge")
    assert f"publishing it to {dest} failed, so {dest} does not hold it" in message
    assert "the bucket does not exist" in message and "Rerun the same command" in message
    assert (out / MANIFEST).is_file()
    # The rerun finds --out up to date and only uploads; the same failure says the same.
    with pytest.raises(UploadError, match=f"{out} is published"):
        mergeflow.merge(base, adapter, out, push_to=dest)


class _FailingPublisher:
    """A low-disk publisher whose ``put`` fails on the shard number ``fail_at``."""

    def __init__(self, fail_at: int, error: Exception) -> None:
        self.fail_at, self.error, self.put_names = fail_at, error, []

    def put(self, path, sha256, size):
        if len(self.put_names) == self.fail_at:
            raise self.error
        self.put_names.append(Path(path).name)

    def finish(self, small, manifest):  # pragma: no cover - never reached
        raise AssertionError("finish after a failed put")


@pytest.mark.parametrize("transient", [False, True], ids=["permanent", "transient"])
def test_low_disk_failing_after_shards_were_shipped_says_which(make_base, make_adapter,
                                                               tmp_path, monkeypatch, transient):
    import mergeflow
    from mergeflow.errors import InputError, UploadError
    from mergeflow.pipeline import steps as api

    base = make_base("llama")
    adapter = make_adapter(base)
    error = TransientError("throttled") if transient else SinkError("s3://bk/m: access denied")
    publisher = _FailingPublisher(2, error)
    monkeypatch.setattr(api, "open_publisher", lambda dest, **options: publisher)
    with pytest.raises(UploadError) as caught:
        mergeflow.merge(base, adapter, tmp_path / "out", push_to="s3://bk/m", low_disk=True,
                        max_shard_size="40KB")
    message = str(caught.value)
    assert not isinstance(caught.value, InputError)
    assert isinstance(caught.value, TransientError) == transient  # still retried when it was
    assert message.startswith("publishing to s3://bk/m failed after 2 of ")
    assert ", ".join(publisher.put_names) in message and "the manifest are not there" in message
    assert str(error) in message and not (tmp_path / "out").exists()

    # Nothing shipped yet: the destination's own error, as it is.
    monkeypatch.setattr(api, "open_publisher", lambda dest, **options: _FailingPublisher(0, error))
    with pytest.raises(type(error)) as first:
        mergeflow.merge(base, adapter, tmp_path / "out", push_to="s3://bk/m", low_disk=True,
                        max_shard_size="40KB")
    assert not isinstance(first.value, UploadError)


def test_cli_exits_1_when_the_destination_fails_after_out_was_published(
        s3_endpoint, make_base, make_adapter, tmp_path, monkeypatch, prefect_server):
    """Through the Prefect flow (--push-to runs it): exit 1, one error line naming both."""
    from typer.testing import CliRunner

    from mergeflow.cli.app import app

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    base = make_base("llama")
    adapter = make_adapter(base)
    out, dest = tmp_path / "merged", "s3://no-such-bucket-mf/cli"
    result = CliRunner().invoke(app, ["merge", "--base", str(base), "--adapter", str(adapter),
                                      "--out", str(out), "--push-to", dest, "--workers", "1"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert f"error: {out} is published and holds the finished merge" in text, text
    assert f"so {dest} does not hold it" in text and "the bucket does not exist" in text
    assert (out / MANIFEST).is_file()
