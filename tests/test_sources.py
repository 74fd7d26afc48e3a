"""Sources: local paths, hf:// through a real (offline) Hugging Face cache, s3:// through moto's
S3 server over real HTTP (with a flaky proxy in front for the retry cases)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from s3_server import SECRET_KEY, FlakyProxy, OperationLog, aws_test_env, moto_s3, new_bucket

from mergeflow.errors import AdapterError, SourceError, TransientError
from mergeflow.remote.fetch import (
    S3_STATE_FILE,
    base_from_adapter,
    hf_error,
    list_s3_prefix,
    parse_hf_ref,
    parse_s3_ref,
    resolve_source,
    s3_client,
    s3_error,
)

GETS = ("GetObject", "HeadObject")


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server for this module, under dummy credentials."""
    with aws_test_env(), moto_s3() as url:
        yield url


@pytest.fixture(scope="module")
def s3_module_client(s3_endpoint):
    """One client for the module (building a boto3 client costs about a second)."""
    return s3_client(s3_endpoint)


@pytest.fixture
def s3(s3_module_client, tmp_path, monkeypatch):
    """A client on the moto server, a fresh bucket, and a private Mergeflow cache."""
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "mergeflow-cache"))
    return s3_module_client, new_bucket(s3_module_client)


@pytest.fixture
def ops(s3):
    """Records the S3 operations of the module client during one test."""
    log = OperationLog(s3[0])
    yield log
    log.close()


def put_folder(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=data)


BASE_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model-00001-of-00002.safetensors": os.urandom(300_000),
    "model-00002-of-00002.safetensors": os.urandom(200_000),
    "model.safetensors.index.json": b'{"metadata": {"total_size": 500000}, "weight_map": {}}',
    "tokenizer.json": b"{}",
    "generation_config.json": b"{}",
    "README.md": b"# not needed for a merge",
    "consolidated.safetensors": os.urandom(1000),
}
ADAPTER_FILES = {
    "adapter_config.json": b'{"base_model_name_or_path": "org/base", "r": 4}',
    "adapter_model.safetensors": os.urandom(50_000),
    "training_args.bin": b"not needed",
}


# --------------------------------------------------------------------------- local and parsing


def test_local_path_is_returned_as_is(tmp_path):
    assert resolve_source(str(tmp_path)) == tmp_path
    assert resolve_source(tmp_path) == tmp_path


def test_missing_local_path_suggests_hf_scheme():
    with pytest.raises(SourceError, match=r"org/name: no such local .*hf://org/name"):
        resolve_source("org/name")


def test_unknown_scheme_is_refused():
    with pytest.raises(SourceError, match="unsupported scheme"):
        resolve_source("gs://bucket/x")


def test_parse_references():
    assert parse_hf_ref("hf://org/name") == ("org/name", None)
    assert parse_hf_ref("hf://org/name@v1.0") == ("org/name", "v1.0")
    assert parse_s3_ref("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_ref("s3://bucket") == ("bucket", "")
    with pytest.raises(SourceError, match="not a Hub repo id"):
        parse_hf_ref("hf://org/name/extra")
    with pytest.raises(SourceError, match=r"'\.\.' segment"):
        parse_s3_ref("s3://bucket/a/../b")


@pytest.mark.parametrize(("config", "expected"), [
    ({"base_model_name_or_path": "org/name"}, "hf://org/name"),
    ({"base_model_name_or_path": "org/name", "revision": "v2"}, "hf://org/name@v2"),
    ({"base_model_name_or_path": "gpt2"}, "hf://gpt2"),
    ({"base_model_name_or_path": "s3://bucket/base"}, "s3://bucket/base"),
    ({"base_model_name_or_path": None}, None),
    ({}, None),
])
def test_base_from_adapter(tmp_path, config, expected):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert base_from_adapter(tmp_path) == expected


def test_base_from_adapter_prefers_an_existing_local_path(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    assert base_from_adapter(tmp_path) == str(base)


def test_base_from_adapter_needs_adapter_config(tmp_path):
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        base_from_adapter(tmp_path)


# --------------------------------------------------------------------------- hf:// offline


def write_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str,
                   refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay out a Hub cache entry as huggingface_hub writes it: blobs by sha256, snapshot symlinks,
    refs naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline Hub cache holding org/tiny at COMMIT (refs main and dev)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    files = {"config.json": b"{}", "model.safetensors": b"weights", "tokenizer.json": b"{}"}
    write_hf_cache(cache, "org/tiny", files, COMMIT, refs=("main", "dev"))
    return cache


def test_hf_cache_layout_is_what_huggingface_hub_reads(hf_cache):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hf_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/tiny" and {r.commit_hash for r in repo.revisions} == {COMMIT}


@pytest.mark.parametrize("ref", ["hf://org/tiny", "hf://org/tiny@dev", f"hf://org/tiny@{COMMIT}"])
def test_hf_offline_from_the_cache(hf_cache, ref):
    folder = resolve_source(ref, cache_dir=hf_cache)
    assert folder.name == COMMIT
    assert (folder / "model.safetensors").read_bytes() == b"weights"


def test_hf_cache_from_hf_home(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_cache.parent))
    assert resolve_source("hf://org/tiny").name == COMMIT


def test_hf_offline_and_not_cached_is_permanent(hf_cache):
    not_cached = r"hf://org/other: not in the local Hugging Face cache .*HF_HUB_OFFLINE"
    with pytest.raises(SourceError, match=not_cached):
        resolve_source("hf://org/other", cache_dir=hf_cache)
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE"):
        resolve_source("hf://org/tiny@no-such-branch", cache_dir=hf_cache)


def _hf_http_error(cls, status: int, message: str = "failed"):
    httpx2 = pytest.importorskip("httpx2")
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return cls(message, response=response)


def test_hf_errors_are_sorted_permanent_or_transient():
    from huggingface_hub import errors as hf

    cases = [
        (_hf_http_error(hf.RepositoryNotFoundError, 404), SourceError, "repository not found"),
        (_hf_http_error(hf.GatedRepoError, 403), SourceError, "gated"),
        (_hf_http_error(hf.RevisionNotFoundError, 404), SourceError, "revision not found"),
        (_hf_http_error(hf.RemoteEntryNotFoundError, 404), SourceError, "file is missing"),
        (_hf_http_error(hf.HfHubHTTPError, 401), SourceError, "HF_TOKEN"),
        (_hf_http_error(hf.HfHubHTTPError, 503), TransientError, "HTTP 503"),
        (_hf_http_error(hf.HfHubHTTPError, 429), TransientError, "HTTP 429"),
        (hf.LocalEntryNotFoundError("not cached"), SourceError, "HF_HUB_OFFLINE"),
    ]
    httpx2 = pytest.importorskip("httpx2")
    cases.append((httpx2.ConnectError("connection reset"), TransientError, "cannot reach"))
    cases.append((httpx2.ReadTimeout("timed out"), TransientError, "cannot reach"))
    for exc, kind, words in cases:
        err = hf_error(exc, "hf://org/x", SourceError, offline=True)
        assert type(err) is kind and words in str(err), (exc, err)


def test_hf_error_messages_never_carry_the_token():
    pytest.importorskip("httpx2")
    import httpx2

    token = "hf_abcdefSECRETtoken123"
    exc = httpx2.ConnectError(f"proxy said: Authorization: Bearer {token}")
    err = hf_error(exc, "hf://org/x", SourceError, secrets=(token,))
    assert token not in str(err) and "***" in str(err)


# --------------------------------------------------------------------------- s3://


def test_s3_download_then_cache_hits(s3, ops):
    client, bucket = s3
    put_folder(client, bucket, "runs/base", BASE_FILES)
    put_folder(client, bucket, "runs/adapter", ADAPTER_FILES)
    ops.clear()

    base = resolve_source(f"s3://{bucket}/runs/base", client=client)
    adapter = resolve_source(f"s3://{bucket}/runs/adapter", client=client)
    wanted = {n for n in BASE_FILES if n not in ("README.md", "consolidated.safetensors")}
    assert {p.name for p in base.iterdir() if not p.name.startswith(".")} == wanted
    assert {p.name for p in adapter.iterdir() if not p.name.startswith(".")} == \
        {"adapter_config.json", "adapter_model.safetensors"}
    for name in wanted:
        assert (base / name).read_bytes() == BASE_FILES[name]
    assert ops.count("GetObject") == len(wanted) + 2
    assert not list(base.glob(".*.part"))

    mtimes = {p: p.stat().st_mtime_ns for p in base.iterdir()}
    ops.clear()
    assert resolve_source(f"s3://{bucket}/runs/base", client=client) == base
    assert resolve_source(f"s3://{bucket}/runs/adapter", client=client) == adapter
    assert ops.count(*GETS) == 0
    assert ops.count("ListObjectsV2") == 2
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in base.iterdir() if p.name != S3_STATE_FILE)


def test_s3_changed_object_is_fetched_again_and_removed_one_pruned(s3, ops):
    client, bucket = s3
    put_folder(client, bucket, "base", BASE_FILES)
    folder = resolve_source(f"s3://{bucket}/base", client=client)
    client.put_object(Bucket=bucket, Key="base/config.json", Body=b'{"model_type": "qwen2"}')
    client.delete_object(Bucket=bucket, Key="base/generation_config.json")
    ops.clear()

    resolve_source(f"s3://{bucket}/base", client=client)
    assert ops.names("GetObject") == ["base/config.json"]
    assert (folder / "config.json").read_bytes() == b'{"model_type": "qwen2"}'
    assert not (folder / "generation_config.json").exists()


def test_s3_listing_follows_pages_and_stays_in_the_folder(s3, ops):
    client, bucket = s3
    put_folder(client, bucket, "m", {f"f{i}.json": b"x" for i in range(5)})
    put_folder(client, bucket, "m/sub", {"deeper.json": b"y"})
    put_folder(client, bucket, "m-other", {"f9.json": b"z"})
    ops.clear()
    objects = list_s3_prefix(client, bucket, "m", page_size=2)
    assert sorted(o.name for o in objects) == [f"f{i}.json" for i in range(5)]
    assert ops.count("ListObjectsV2") == 3


def test_s3_empty_prefix_is_permanent(s3):
    client, bucket = s3
    put_folder(client, bucket, "elsewhere", {"config.json": b"{}"})
    with pytest.raises(SourceError, match=rf"s3://{bucket}/nothing-here: no model or adapter files"):
        resolve_source(f"s3://{bucket}/nothing-here", client=client)


def test_s3_missing_bucket_is_permanent_and_leaks_no_secret(s3_module_client, caplog):
    caplog.set_level(logging.DEBUG)
    client = s3_module_client
    with pytest.raises(SourceError, match="s3://no-such-bucket-mf/base: the bucket does not exist") as info:
        resolve_source("s3://no-such-bucket-mf/base", client=client)
    assert SECRET_KEY not in str(info.value) and SECRET_KEY not in caplog.text


def test_s3_endpoint_from_the_environment(s3, monkeypatch):
    client, bucket = s3
    put_folder(client, bucket, "base", {"config.json": b"{}"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", client.meta.endpoint_url)
    assert (resolve_source(f"s3://{bucket}/base") / "config.json").read_bytes() == b"{}"


def test_s3_throttling_survived_by_retries(s3):
    client, bucket = s3
    put_folder(client, bucket, "base", {"config.json": b"{}", "model.safetensors": b"w" * 1000})
    with FlakyProxy(client.meta.endpoint_url, fail=2) as proxy:
        flaky = s3_client(proxy.url, max_attempts=3)
        folder = resolve_source(f"s3://{bucket}/base", client=flaky)
    assert proxy.failed == 2
    assert (folder / "model.safetensors").read_bytes() == b"w" * 1000


def test_s3_throttling_beyond_retries_is_transient(s3, caplog):
    caplog.set_level(logging.DEBUG)
    client, bucket = s3
    put_folder(client, bucket, "base", {"config.json": b"{}"})
    with FlakyProxy(client.meta.endpoint_url, fail=1000) as proxy:
        flaky = s3_client(proxy.url, max_attempts=1)
        with pytest.raises(TransientError, match=r"SlowDown \(HTTP 503\)") as info:
            resolve_source(f"s3://{bucket}/base", client=flaky)
    assert SECRET_KEY not in str(info.value) and SECRET_KEY not in caplog.text


def test_s3_unreachable_endpoint_is_transient(s3):
    _, bucket = s3
    with FlakyProxy("127.0.0.1:9") as proxy:
        dead = proxy.url
    client = s3_client(dead, max_attempts=1, connect_timeout=1)
    with pytest.raises(TransientError, match="connection failed"):
        resolve_source(f"s3://{bucket}/base", client=client)


def test_s3_cache_survives_a_deleted_file(s3):
    client, bucket = s3
    put_folder(client, bucket, "base", {"config.json": b"{}", "model.safetensors": b"abc"})
    folder = resolve_source(f"s3://{bucket}/base", client=client)
    (folder / "model.safetensors").unlink()
    assert (resolve_source(f"s3://{bucket}/base", client=client) / "model.safetensors").read_bytes() == b"abc"


def _client_error(code: str, status: int, operation: str = "GetObject"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": f"{code} happened"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


@pytest.mark.parametrize(("code", "status", "kind", "words"), [
    ("AccessDenied", 403, SourceError, "access denied"),
    ("403", 403, SourceError, "access denied"),
    ("InvalidAccessKeyId", 403, SourceError, "rejected the credentials"),
    ("SignatureDoesNotMatch", 403, SourceError, "rejected the credentials"),
    ("NoSuchBucket", 404, SourceError, "bucket does not exist"),
    ("NoSuchKey", 404, SourceError, "not found"),
    ("InvalidRequest", 400, SourceError, "refused the request"),
    ("SlowDown", 503, TransientError, "SlowDown"),
    ("InternalError", 500, TransientError, "HTTP 500"),
    ("RequestTimeout", 400, TransientError, "RequestTimeout"),
    ("TooManyRequests", 429, TransientError, "HTTP 429"),
])
def test_s3_client_errors_are_sorted(code, status, kind, words):
    err = s3_error(_client_error(code, status), "s3://b/k", SourceError)
    assert type(err) is kind and words in str(err) and str(err).startswith("s3://b/k: ")


def test_s3_transport_errors_are_transient_and_credentials_permanent():
    from boto3.exceptions import S3UploadFailedError
    from botocore import exceptions as bce

    transient = [
        bce.ConnectionClosedError(endpoint_url="http://s3"),
        bce.ReadTimeoutError(endpoint_url="http://s3"),
        bce.EndpointConnectionError(endpoint_url="http://s3"),
    ]
    for exc in transient:
        assert type(s3_error(exc, "s3://b/k", SourceError)) is TransientError
    assert type(s3_error(bce.NoCredentialsError(), "s3://b/k", SourceError)) is SourceError
    try:  # boto3 wraps upload failures (raising inside its except); the ClientError decides
        try:
            raise _client_error("SlowDown", 503, "UploadPart")
        except bce.ClientError as exc:
            raise S3UploadFailedError(f"Failed to upload: {exc}")  # noqa: B904 - as boto3 does
    except S3UploadFailedError as wrapped:
        assert type(s3_error(wrapped, "s3://b/k", SourceError)) is TransientError
