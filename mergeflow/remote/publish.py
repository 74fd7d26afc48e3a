"""Publish a finished output folder to the Hugging Face Hub (``hf://org/name``) or S3
(``s3://bucket/prefix``) so that no reader ever sees a half-published model.

A folder is publishable only when it holds ``merge-manifest.json`` (the merge's completion marker)
and every file the manifest lists, at its listed size.

* **Hugging Face Hub**: the repo (and branch) is created if needed, large files are pre-uploaded
  to LFS storage one by one, and ONE commit (or pull request) adds every file, the model card and
  the manifest together: the repo shows the old model or the new one, never a mix.
* **S3**: every object is uploaded with SHA256 transfer checksums (multipart for large files) and
  carries the file's full sha256 as metadata (``x-amz-meta-sha256``); an object whose metadata and
  size already match is skipped, so a rerun sends only what is missing. A stale manifest is
  deleted before the first changed object is written, and the new manifest is written LAST:
  readers treat a prefix without a manifest as incomplete.

Both destinations share one shape, for low-disk runs that publish each shard as soon as it is
written and verified (then delete it locally)::

    publisher = open_publisher("s3://bucket/models/x", part_size=64 * 2**20)
    publisher.put(shard_path, sha256, size)        # per shard, as it is finished
    publisher.finish(small_files, manifest_path)   # configs, tokenizer, card; manifest last

:func:`publish` does exactly this for a finished folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from mergeflow import faults
from mergeflow.errors import MergeError, SinkError, SourceError
from mergeflow.output.folder import MANIFEST, read_manifest
from mergeflow.remote.fetch import (
    HF_SCHEME,
    S3_SCHEME,
    hf_error,
    parse_hf_ref,
    parse_s3_ref,
    raise_s3,
    s3_client,
    s3_key,
)
from mergeflow.storage.hashing import sha256_file

log = logging.getLogger(__name__)

MiB = 2**20
S3_MIN_PART = 5 * MiB
LARGE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
SSE_MODES = ("AES256", "aws:kms", "aws:kms:dsse")


class PublishResult(BaseModel):
    """What one publish did: files sent, files already there, bytes sent, and the Hub URL."""

    dest: str
    uploaded: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)
    bytes_sent: int = 0
    url: str | None = None


class Publisher(Protocol):
    """A destination being published: ``put`` each large file, then ``finish`` once."""

    dest: str

    def put(self, path: Path, sha256: str, size: int) -> bool:
        """Send one (large) file; True when it was sent, False when it was already there."""
        ...

    def finish(self, small_files: Sequence[Path], manifest: Path) -> PublishResult:
        """Send the small files and - last - the manifest; the model becomes visible."""
        ...


# --------------------------------------------------------------------------- entry points


def publish(folder: str | os.PathLike, dest: str, **options: Any) -> PublishResult:
    """Publish a finished output folder to ``hf://org/name[@branch]`` or ``s3://bucket/prefix``.

    Args:
        folder: a finished merge output (holds ``merge-manifest.json``).
        dest: the destination reference.
        **options: the options of :class:`HfPublisher` (``api``, ``token``, ``private``,
            ``revision``, ``create_pr``, ``commit_message``) or :class:`S3Publisher`
            (``endpoint_url``, ``client``, ``sse``, ``kms_key_id``, ``part_size``,
            ``multipart_threshold``, ``max_concurrency``, ``max_attempts``); options set to None
            are ignored.

    Returns:
        A :class:`PublishResult`.

    Raises:
        SinkError: the folder is not finished, or the destination cannot be used.
        TransientError: a failure worth retrying (network, throttling, HTTP 5xx).
    """
    folder = Path(folder)
    files = finished_files(folder)
    publisher = open_publisher(dest, **options)
    for name in sorted(n for n in files if is_large_file(n)):
        publisher.put(folder / name, files[name]["sha256"], files[name]["size"])
    small = [folder / n for n in sorted(files) if not is_large_file(n)]
    result = publisher.finish(small, folder / MANIFEST)
    log.info("%s: published %d file(s) (%d bytes), %d already there", dest, len(result.uploaded),
             result.bytes_sent, len(result.skipped))
    return result


def publish_file(path: str | os.PathLike, dest: str | Publisher, *, sha256: str | None = None,
                 **options: Any) -> PublishResult:
    """Publish one large file now (low-disk runs: publish a shard, then delete it locally).

    ``dest`` is a publisher from :func:`open_publisher` (needed for ``hf://``, whose files become
    visible only with the publisher's final commit) or an ``s3://`` reference (a one-shot
    upload; call ``open_publisher(dest).finish(...)`` after the last shard).

    Returns:
        A :class:`PublishResult` for this file alone.
    """
    path = Path(path)
    if isinstance(dest, str):
        if dest.startswith(HF_SCHEME):
            raise SinkError(f"{dest}: a Hub file becomes visible only with the final commit; use "
                            "open_publisher(dest).put(...) and .finish(...) in one process")
        publisher: Publisher = open_publisher(dest, **options)
    elif options:
        raise SinkError(f"{dest.dest}: options go to open_publisher(), not with a publisher")
    else:
        publisher = dest
    sha256 = sha256 or sha256_file(path)
    size = path.stat().st_size
    sent = publisher.put(path, sha256, size)
    return PublishResult(dest=publisher.dest, uploaded=[path.name] if sent else [],
                         skipped=[] if sent else [path.name], bytes_sent=size if sent else 0)


def open_publisher(dest: str, **options: Any) -> HfPublisher | S3Publisher:
    """The publisher for ``dest`` (``hf://`` or ``s3://``); options set to None are dropped.

    Raises:
        SinkError: unknown scheme, or an option that does not apply to this destination.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if dest.startswith(HF_SCHEME):
        cls: type[HfPublisher] | type[S3Publisher] = HfPublisher
    elif dest.startswith(S3_SCHEME):
        cls = S3Publisher
    else:
        raise SinkError(f"{dest}: unsupported destination; publish to hf://org/name or "
                        "s3://bucket/prefix (a local `out` folder needs no publishing)")
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
        raise SinkError(f"{dest}: option(s) {', '.join(unknown)} do not apply to "
                        f"{dest.split('://')[0]}:// destinations")
    return cls(dest, **options)


def finished_files(folder: Path) -> dict[str, dict]:
    """The manifest's ``files`` of a finished folder, checked present at their listed sizes.

    Raises:
        SinkError: no manifest, or a listed file is missing or has another size.
    """
    manifest = read_manifest(folder)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        raise SinkError(f"{folder}: no readable {MANIFEST}, so it is not a finished merge; run "
                        "the merge to completion before publishing")
    files = manifest["files"]
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry.get("size"):
            raise SinkError(f"{path}: missing or not the size the manifest lists; re-run the "
                            "merge (or `mergeflow verify`) before publishing")
    return files


def is_large_file(name: str) -> bool:
    """Whether a file is weights (put one by one) rather than a small config/tokenizer file."""
    return name.endswith(LARGE_SUFFIXES)


def _manifest_entries(manifest: Path) -> dict[str, dict]:
    """The ``files`` of a manifest file ({name: {size, sha256}})."""
    try:
        files = json.loads(Path(manifest).read_text()).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        raise SinkError(f"{manifest}: unreadable manifest ({type(exc).__name__}); re-run the merge") from exc
    if not isinstance(files, dict):
        raise SinkError(f"{manifest}: the manifest lists no files; re-run the merge")
    return files


def _as_sink_error(exc: SourceError) -> SinkError:
    """A reference-parsing SourceError restated as a SinkError."""
    return SinkError(str(exc))


# --------------------------------------------------------------------------- S3


class S3Publisher:
    """Publish to ``s3://bucket/prefix``: skip matching objects, upload the rest, manifest last.

    Args:
        dest: ``s3://bucket/prefix``.
        endpoint_url: S3 endpoint (default ``AWS_ENDPOINT_URL`` / the standard chain).
        client: a ready boto3 S3 client (overrides ``endpoint_url`` and ``max_attempts``).
        sse: server-side encryption: "AES256", "aws:kms" or "aws:kms:dsse".
        kms_key_id: the KMS key for "aws:kms" (default: the account's S3 key).
        part_size: multipart part size in bytes (at least 5 MiB).
        multipart_threshold: files from this size up go multipart (default ``part_size``).
        max_concurrency: parts in flight per file (1: no threads).
        max_attempts: tries per request in botocore's standard retry mode.
    """

    OPTIONS = ("endpoint_url", "client", "sse", "kms_key_id", "part_size", "multipart_threshold",
               "max_concurrency", "max_attempts")

    def __init__(self, dest: str, *, endpoint_url: str | None = None, client: Any | None = None,
                 sse: str | None = None, kms_key_id: str | None = None, part_size: int = 64 * MiB,
                 multipart_threshold: int | None = None, max_concurrency: int = 8,
                 max_attempts: int = 5) -> None:
        from boto3.s3.transfer import TransferConfig

        self.dest = dest
        try:
            self.bucket, self.prefix = parse_s3_ref(dest)
            self.client = client or s3_client(endpoint_url, max_attempts=max_attempts)
        except SourceError as exc:
            raise _as_sink_error(exc) from exc
        self._extra = _s3_extra_args(dest, sse, kms_key_id)
        if part_size < S3_MIN_PART:
            raise SinkError(f"{dest}: part_size {part_size} is below S3's 5 MiB minimum part size")
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold or part_size,
                                       multipart_chunksize=part_size, max_concurrency=max_concurrency,
                                       use_threads=max_concurrency > 1)
        self.result = PublishResult(dest=dest)
        self._present: dict[str, tuple[str, int]] = {}  # name -> (sha256, size) known at the dest
        self._manifest_cleared = False

    def put(self, path: Path, sha256: str, size: int) -> bool:
        """Upload one file unless the object already has this sha256 and size.

        Raises:
            SinkError: the file is the manifest (use :meth:`finish`), or the destination refuses.
            TransientError: throttling, HTTP 5xx, connection failures after retries.
        """
        path = Path(path)
        if path.name == MANIFEST:
            raise SinkError(f"{path}: the manifest is published last, by finish()")
        return self._put(path, path.name, sha256, size)

    def finish(self, small_files: Sequence[Path], manifest: Path) -> PublishResult:
        """Upload the small files, check every manifest file is in place, then the manifest.

        Raises:
            SinkError: a file the manifest lists was never published (nor is at the destination).
        """
        entries = _manifest_entries(manifest)
        for path in map(Path, small_files):
            sha256 = entries.get(path.name, {}).get("sha256") or sha256_file(path)
            self._put(path, path.name, sha256, path.stat().st_size)
        self._check_complete(entries)
        manifest = Path(manifest)
        self._put(manifest, MANIFEST, sha256_file(manifest), manifest.stat().st_size)
        return self.result

    def _where(self, name: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/{s3_key(self.prefix, name)}"

    def _put(self, path: Path, name: str, sha256: str, size: int) -> bool:
        """Skip or upload one object; record the outcome."""
        if path.stat().st_size != size:
            raise SinkError(f"{path}: {path.stat().st_size} bytes, but {size} expected; the file "
                            "changed after the merge, re-run it")
        if self._matches(name, sha256, size):
            self.result.skipped.append(name)
        else:
            if name != MANIFEST:
                self._clear_old_manifest()
            self._upload(path, name, sha256)
            self.result.uploaded.append(name)
            self.result.bytes_sent += size
        self._present[name] = (sha256, size)
        return name in self.result.uploaded

    def _matches(self, name: str, sha256: str, size: int) -> bool:
        """Whether the object exists with this sha256 metadata and size."""
        head = self._head(name)
        return (head is not None and int(head.get("ContentLength", -1)) == size
                and head.get("Metadata", {}).get("sha256") == sha256)

    def _head(self, name: str) -> dict | None:
        """The object's HEAD answer, or None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=s3_key(self.prefix, name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise_s3(exc, self._where(name), SinkError)
        except Exception as exc:
            raise_s3(exc, self._where(name), SinkError)

    def _clear_old_manifest(self) -> None:
        """Before the first changed object: delete an old manifest, marking the prefix incomplete."""
        if self._manifest_cleared:
            return
        if self._head(MANIFEST) is not None:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=s3_key(self.prefix, MANIFEST))
            except Exception as exc:
                raise_s3(exc, self._where(MANIFEST), SinkError)
            log.info("%s: removed the previous manifest; the prefix is incomplete until this "
                     "publish finishes", self.dest)
        self._manifest_cleared = True

    def _upload(self, path: Path, name: str, sha256: str) -> None:
        """One upload (multipart above the threshold) with SHA256 checksums and sha256 metadata."""
        extra = {**self._extra, "Metadata": {"sha256": sha256}, "ContentType": _content_type(name)}
        point = "s3-manifest-put" if name == MANIFEST else "s3-put"
        faults.checkpoint(f"before-{point}")
        try:
            self.client.upload_file(str(path), self.bucket, s3_key(self.prefix, name),
                                    ExtraArgs=extra, Config=self.transfer)
        except Exception as exc:
            raise_s3(exc, self._where(name), SinkError)
        faults.checkpoint(f"after-{point}")

    def _check_complete(self, entries: dict[str, dict]) -> None:
        """Refuse to write the manifest while a file it lists is not at the destination."""
        for name, entry in sorted(entries.items()):
            expected = (entry.get("sha256"), entry.get("size"))
            if self._present.get(name) == expected:
                continue
            if name in self._present or not self._matches(name, *expected):
                raise SinkError(f"{self._where(name)}: not published with the manifest's sha256 "
                                "and size; put() it before finish()")
            self._present[name] = expected  # published earlier (another process)
            self.result.skipped.append(name)


def _s3_extra_args(dest: str, sse: str | None, kms_key_id: str | None) -> dict[str, Any]:
    """Upload arguments shared by every object: checksums and server-side encryption."""
    extra: dict[str, Any] = {"ChecksumAlgorithm": "SHA256"}
    if sse is not None and sse not in SSE_MODES:
        raise SinkError(f"{dest}: sse {sse!r} is not one of {', '.join(SSE_MODES)}")
    if kms_key_id and not (sse or "").startswith("aws:kms"):
        raise SinkError(f"{dest}: kms_key_id needs sse='aws:kms' (or 'aws:kms:dsse')")
    if sse:
        extra["ServerSideEncryption"] = sse
    if kms_key_id:
        extra["SSEKMSKeyId"] = kms_key_id
    return extra


def _content_type(name: str) -> str:
    if name.endswith(".json"):
        return "application/json"
    if name.endswith(".md"):
        return "text/markdown"
    return "application/octet-stream"


# --------------------------------------------------------------------------- Hugging Face Hub


class HfPublisher:
    """Publish to ``hf://org/name[@branch]`` in ONE commit (or one pull request).

    :meth:`put` pre-uploads a large file to the Hub's LFS storage (it is not visible yet, and
    the local file may then be deleted); :meth:`finish` commits every pre-uploaded file, the
    small files and the manifest together.

    Args:
        dest: ``hf://org/name`` (``@branch`` names the branch, like ``revision``).
        api: an ``HfApi``-like object (default ``HfApi(token=token)``).
        token: Hugging Face token (default ``HF_TOKEN`` or the stored login).
        private: visibility of a repo created now (None: the Hub's default; an existing repo
            keeps its visibility).
        revision: the branch to commit to (created from main when missing).
        create_pr: open a pull request instead of committing to the branch.
        commit_message: the commit (or PR) title.
    """

    OPTIONS = ("api", "token", "private", "revision", "create_pr", "commit_message")

    def __init__(self, dest: str, *, api: Any | None = None, token: str | None = None,
                 private: bool | None = None, revision: str | None = None, create_pr: bool = False,
                 commit_message: str | None = None) -> None:
        try:
            self.repo_id, ref_revision = parse_hf_ref(dest)
        except SourceError as exc:
            raise _as_sink_error(exc) from exc
        if revision and ref_revision and revision != ref_revision:
            raise SinkError(f"{dest}: revision {revision!r} contradicts the '@{ref_revision}' in "
                            "the destination; give one of them")
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        self.dest, self.api, self.token = dest, api, token
        self.private, self.create_pr, self.commit_message = private, create_pr, commit_message
        self.revision = revision or ref_revision
        self.result = PublishResult(dest=dest)
        self._operations: dict[str, Any] = {}
        self._started = False

    def put(self, path: Path, sha256: str, size: int) -> bool:
        """Pre-upload one large file (checked against ``sha256``); always True.

        Raises:
            SinkError: the file's sha256 is not the manifest's, or the Hub refuses.
            TransientError: the Hub could not be reached or answered 429/5xx.
        """
        path = Path(path)
        self._start()
        operation = self._operation(path, sha256)
        self._call("preupload_lfs_files", self.repo_id, [operation], token=self.token,
                   revision=self.revision, create_pr=self.create_pr)
        self._operations[path.name] = operation
        self.result.uploaded.append(path.name)
        self.result.bytes_sent += size
        return True

    def finish(self, small_files: Sequence[Path], manifest: Path) -> PublishResult:
        """Commit every put file, the small files and the manifest in one commit.

        Raises:
            SinkError: a file the manifest lists was neither put nor given here.
        """
        self._start()
        entries = _manifest_entries(manifest)
        operations = dict(self._operations)
        for path in map(Path, small_files):
            operations[path.name] = self._operation(path, entries.get(path.name, {}).get("sha256"))
            self.result.uploaded.append(path.name)
            self.result.bytes_sent += path.stat().st_size
        missing = sorted(set(entries) - set(operations))
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise SinkError(f"{self.dest}: {', '.join(missing[:3])}{more} listed in the manifest "
                            "but not published; put() them before finish()")
        operations[MANIFEST] = self._operation(Path(manifest), None)
        self.result.uploaded.append(MANIFEST)
        self.result.bytes_sent += Path(manifest).stat().st_size
        info = self._call("create_commit", self.repo_id, operations=list(operations.values()),
                          commit_message=self.commit_message or self._default_message(len(operations)),
                          token=self.token, revision=self.revision, create_pr=self.create_pr)
        self.result.url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None)
        return self.result

    def _start(self) -> None:
        """Create the repo (and the branch) once, before the first upload."""
        if self._started:
            return
        self._call("create_repo", self.repo_id, private=self.private, exist_ok=True,
                   token=self.token, repo_type="model")
        if self.revision and self.revision != "main":
            self._call("create_branch", self.repo_id, branch=self.revision, exist_ok=True,
                       token=self.token)
        self._started = True

    def _operation(self, path: Path, sha256: str | None) -> Any:
        """A CommitOperationAdd for ``path``, checked against the manifest's sha256 when given."""
        from huggingface_hub import CommitOperationAdd

        operation = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        if sha256 and operation.upload_info.sha256.hex() != sha256:
            raise SinkError(f"{path}: its sha256 differs from the manifest's; the file changed "
                            "after the merge, re-run it")
        return operation

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the Hub API, translating its errors."""
        try:
            return getattr(self.api, method)(*args, **kwargs)
        except MergeError:
            raise
        except Exception as exc:
            raise hf_error(exc, self.dest, SinkError, secrets=(self.token,)) from exc

    def _default_message(self, count: int) -> str:
        return f"Upload merged model with Mergeflow ({count} files)"
