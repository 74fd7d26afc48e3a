"""Issue 6 end to end: adapter from s3://, merged, published to s3:// (moto's server over HTTP).

A second identical run transfers nothing; --low-disk never holds more than one shard locally and
publishes the same objects.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from s3_server import aws_test_env, moto_s3, new_bucket

import mergeflow
from mergeflow.output.folder import MANIFEST
from mergeflow.remote.fetch import s3_client
from mergeflow.storage.staging import Staging


@pytest.fixture(scope="module")
def s3_endpoint():
    with aws_test_env(), moto_s3() as url:
        os.environ["AWS_ENDPOINT_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture(scope="module")
def client(s3_endpoint):
    return s3_client(s3_endpoint)


def _upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"].rsplit("/", 1)[1]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed}


@pytest.fixture(scope="module")
def s3_inputs(client, make_base, make_adapter):
    base = make_base("llama", max_shard_size="60KB")
    adapter = make_adapter(base, target_modules=["q_proj", "v_proj", "down_proj"])
    bucket = new_bucket(client, "runs")
    _upload_folder(client, adapter, bucket, "42/adapter")
    return base, f"s3://{bucket}/42/adapter"


def test_s3_in_s3_out_and_rerun_transfers_nothing(client, s3_inputs, tmp_path, monkeypatch):
    base, adapter_ref = s3_inputs
    models = new_bucket(client, "models")
    dest = f"s3://{models}/run-42"
    report = mergeflow.merge(base, adapter_ref, tmp_path / "out", push_to=dest,
                             max_shard_size="40KB")
    assert report.shards > 1
    published = _objects(client, models, "run-42")
    local = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert published == local

    # A second identical run: the adapter comes from the cache, the objects are already there.
    import boto3

    sent: list[str] = []
    real_client = boto3.session.Session.client

    def counting_client(self, *args, **kwargs):
        made = real_client(self, *args, **kwargs)
        made.meta.events.register("before-call.s3",
                                  lambda model, **kw: sent.append(model.name))
        return made

    monkeypatch.setattr(boto3.session.Session, "client", counting_client)
    again = mergeflow.merge(base, adapter_ref, tmp_path / "out", push_to=dest,
                            max_shard_size="40KB")
    assert again.status == "up-to-date"
    transfers = [c for c in sent if c in ("GetObject", "PutObject", "UploadPart",
                                         "CreateMultipartUpload")]
    assert "ListObjectsV2" in sent and "HeadObject" in sent  # it did look
    assert transfers == [], transfers


def test_low_disk_keeps_one_shard_and_publishes_the_same_objects(client, s3_inputs, tmp_path,
                                                                monkeypatch):
    base, adapter_ref = s3_inputs
    models = new_bucket(client, "models")
    reference = mergeflow.merge(base, adapter_ref, tmp_path / "ref", max_shard_size="40KB")

    staging = Staging.for_output(tmp_path / "out").folder
    peak = {"shards": 0}
    from mergeflow.pipeline import steps as api

    real_put = api.open_publisher

    def watching_publisher(dest, **options):
        publisher = real_put(dest, **options)
        put = publisher.put

        def put_and_watch(path, sha256, size):
            shards = [p for p in staging.glob("*.safetensors")]
            peak["shards"] = max(peak["shards"], len(shards))
            return put(path, sha256, size)

        publisher.put = put_and_watch
        return publisher

    monkeypatch.setattr(api, "open_publisher", watching_publisher)
    report = mergeflow.merge(base, adapter_ref, tmp_path / "out", push_to=f"s3://{models}/ld",
                             max_shard_size="40KB", low_disk=True)
    assert report.shards == reference.shards > 2
    assert peak["shards"] == 1
    assert not staging.exists() and not (tmp_path / "out").exists()
    published = _objects(client, models, "ld")
    expected = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
    assert published == expected
    assert MANIFEST in published


def test_low_disk_needs_a_destination(make_base, tmp_path):
    with pytest.raises(ValueError, match="`low_disk=True` needs `push_to`"):
        mergeflow.merge(make_base("llama"), tmp_path, tmp_path / "out", low_disk=True)
    shutil.rmtree(tmp_path, ignore_errors=True)
