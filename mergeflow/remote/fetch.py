"""Input references resolved to local folders: a local path, ``hf://org/name[@revision]`` or
``s3://bucket/prefix``.

* A local path is returned as it is (it must exist); nothing contacts the network.
* ``hf://`` goes through ``huggingface_hub.snapshot_download`` and its cache (``HF_HOME`` /
  ``HF_HUB_CACHE``), fetching only the files a merge needs; ``HF_HUB_OFFLINE=1`` means the local
  cache only, and ``HF_TOKEN`` (or ``token=``) authenticates.
* ``s3://`` mirrors the objects directly under the prefix into Mergeflow's cache
  (``<cache>/s3/<bucket>/<prefix>/``), remembering each object's ETag and size, so resolving the
  same prefix again downloads only what changed. Every download lands under a temporary name and
  is renamed into place.

Failures are sorted the way orchestrators need: :class:`~mergeflow.errors.SourceError`
(permanent: a missing repo, revision, bucket or prefix, no access, offline and not cached) or
:class:`~mergeflow.errors.TransientError` (connection problems, timeouts, throttling, HTTP 5xx),
with one-line messages that name the reference and never a credential.

The S3 and Hugging Face helpers here (:func:`s3_client`, :func:`s3_error`, :func:`hf_error`,
:func:`parse_s3_ref`, :func:`parse_hf_ref`) are shared with :mod:`mergeflow.remote.publish`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from mergeflow.errors import AdapterError, InputError, MergeError, SourceError, TransientError
from mergeflow.output.folder import TOKENIZER_FILES
from mergeflow.storage.hashing import cache_dir as mergeflow_cache_dir

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
S3_SCHEME = "s3://"

#: What a merge reads from a base or adapter repository: weights (``model*.safetensors`` and
#: the index; not ``consolidated.safetensors`` duplicates), configs, tokenizer, adapter files.
MERGE_FILE_PATTERNS: tuple[str, ...] = (
    "model*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    *TOKENIZER_FILES,
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
#: A base's weights as PyTorch zip pickles: fetched only where no ``model*.safetensors`` is (a
#: repo holding both formats is merged from safetensors, so the .bin files are never fetched).
BIN_WEIGHT_PATTERNS: tuple[str, ...] = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
SAFETENSORS_WEIGHTS = "model*.safetensors"

S3_STATE_FILE = ".mergeflow-s3.json"  # inside each S3 mirror folder: {name: {etag, size}}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


# --------------------------------------------------------------------------- entry points


def resolve_source(ref: str | os.PathLike, *, allow_patterns: Sequence[str] | None = MERGE_FILE_PATTERNS,
                   cache_dir: str | os.PathLike | None = None, token: str | None = None,
                   endpoint_url: str | None = None, client: Any | None = None) -> Path:
    """Turn an input reference into a local folder holding its files.

    Args:
        ref: a local path, ``hf://org/name[@revision]`` or ``s3://bucket/prefix``.
        allow_patterns: glob patterns of the files to fetch (default: what a merge needs);
            None fetches everything. Not applied to local paths.
        cache_dir: for ``hf://`` the Hugging Face hub cache (default ``HF_HUB_CACHE``, else
            ``$HF_HOME/hub``); for ``s3://`` the root of the mirrors (default
            ``<mergeflow cache>/s3``).
        token: Hugging Face token (default: ``HF_TOKEN`` or the stored login).
        endpoint_url: S3 endpoint (default: ``AWS_ENDPOINT_URL`` / the standard AWS chain).
        client: a ready boto3 S3 client to use instead of building one.

    Returns:
        The local folder (a local ``ref`` is returned unchanged).

    Raises:
        SourceError: permanent failure (missing, forbidden, offline and not cached).
        TransientError: a failure worth retrying (network, throttling, HTTP 5xx).
    """
    text = os.fspath(ref)
    if text.startswith(HF_SCHEME):
        return resolve_hf(text, allow_patterns=allow_patterns, cache_dir=cache_dir, token=token)
    if text.startswith(S3_SCHEME):
        return resolve_s3(text, allow_patterns=allow_patterns, cache_dir=cache_dir,
                          endpoint_url=endpoint_url, client=client)
    if "://" in text:
        raise SourceError(f"{text}: unsupported scheme; use a local path, hf://org/name or s3://bucket/prefix")
    return _local(text)


def base_from_adapter(adapter_dir: str | os.PathLike) -> str | None:
    """The base model reference an adapter names, so ``base`` can be omitted.

    Reads ``base_model_name_or_path`` (and ``revision``) of ``adapter_config.json``. An existing
    local path or an ``hf://`` / ``s3://`` reference is returned as written; a Hub id such as
    ``org/name`` becomes ``hf://org/name[@revision]``. Returns None when the field is empty.

    Raises:
        AdapterError: the folder has no readable ``adapter_config.json``.
    """
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable ({type(exc).__name__}); the adapter folder needs "
                           "PEFT's adapter_config.json") from exc
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not name or not isinstance(name, str):
        return None
    if name.startswith((HF_SCHEME, S3_SCHEME)) or Path(name).expanduser().exists():
        return name
    if _HUB_ID.match(name):
        revision = config.get("revision")
        return f"{HF_SCHEME}{name}" + (f"@{revision}" if isinstance(revision, str) and revision else "")
    return name


def _local(text: str) -> Path:
    """A local reference: returned as is (``~`` expanded) when it exists."""
    path = Path(text).expanduser()
    if path.exists():
        return path
    hint = f"; for a Hugging Face Hub model write hf://{text}" if _HUB_ID.match(text) else ""
    raise SourceError(f"{text}: no such local file or folder{hint}")


# --------------------------------------------------------------------------- Hugging Face Hub


def parse_hf_ref(ref: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` -> (``org/name``, revision or None)."""
    body = ref[len(HF_SCHEME):] if ref.startswith(HF_SCHEME) else ref
    repo_id, _, revision = body.partition("@")
    repo_id = repo_id.strip("/")
    if not _HUB_ID.match(repo_id):
        raise SourceError(f"{ref}: not a Hub repo id; write hf://org/name or hf://org/name@revision")
    return repo_id, revision or None


def hf_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The Hugging Face hub cache: the argument, ``HF_HUB_CACHE``, ``$HF_HOME/hub``, else None
    (huggingface_hub's own default). Read at call time, so a changed environment is honoured."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def resolve_hf(ref: str, *, allow_patterns: Sequence[str] | None = MERGE_FILE_PATTERNS,
               cache_dir: str | os.PathLike | None = None, token: str | None = None) -> Path:
    """Download (or find in the cache) the merge files of ``hf://org/name[@revision]``.

    Raises:
        SourceError: missing/gated/private repo, missing revision, offline and not cached.
        TransientError: the Hub could not be reached or answered 429/5xx.
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_hf_ref(ref)
    offline = hf_offline()
    cache = hf_cache_dir(cache_dir)
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, token=token, local_files_only=offline,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
        )
        if allow_patterns is MERGE_FILE_PATTERNS and _lacks_weights(Path(folder)):
            folder = snapshot_download(  # the same commit (a snapshot folder is named by it)
                repo_id, revision=Path(folder).name, cache_dir=cache, token=token,
                local_files_only=offline, allow_patterns=list(BIN_WEIGHT_PATTERNS))
    except Exception as exc:
        raise hf_error(exc, ref, SourceError, offline=offline, cache=cache, secrets=(token,)) from exc
    path = Path(folder)
    if not path.is_dir() or not any(path.iterdir()):
        raise SourceError(f"{ref}: no model or adapter files at this revision (or an empty cached "
                          "snapshot); check the repo id and revision")
    return path


def hf_error(exc: BaseException, where: str, kind: type[InputError], *, offline: bool = False,
             cache: Path | None = None, secrets: Iterable[str | None] = ()) -> MergeError:
    """Translate a huggingface_hub (or HTTP transport) error into a Mergeflow error.

    ``kind`` is the permanent class (``SourceError`` or ``SinkError``); 429, 5xx, timeouts and
    connection failures become :class:`TransientError`.
    """
    from huggingface_hub import errors as hf

    access = "read" if kind is SourceError else "write"
    if isinstance(exc, hf.LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        if offline or cause is None or isinstance(cause, hf.OfflineModeIsEnabled):
            where_cache = f" ({cache})" if cache else ""
            return kind(_clean(f"{where}: not in the local Hugging Face cache{where_cache} and "
                               "HF_HUB_OFFLINE is set; download it once with network access or "
                               "unset HF_HUB_OFFLINE", secrets))
        return hf_error(cause, where, kind, secrets=secrets)
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return kind(f"{where}: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it")
    if isinstance(exc, hf.GatedRepoError):
        return kind(f"{where}: gated repository; accept its terms on the Hub and set HF_TOKEN "
                    f"to a token with {access} access")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return kind(f"{where}: repository not found (or private); check the id, or set HF_TOKEN "
                    f"to a token with {access} access")
    if isinstance(exc, hf.RevisionNotFoundError):
        return kind(f"{where}: revision not found; check the branch, tag or commit after '@'")
    if isinstance(exc, hf.EntryNotFoundError):
        return kind(f"{where}: a requested file is missing from the repository; check that the "
                    "revision holds a complete model")
    if isinstance(exc, hf.HfHubHTTPError):
        return _hf_http_error(exc, where, kind, access)
    if isinstance(exc, _transport_errors()):
        return TransientError(_clean(f"{where}: cannot reach the Hugging Face Hub "
                                     f"({type(exc).__name__}: {exc}); retry", secrets))
    if isinstance(exc, ValueError):
        return kind(_clean(f"{where}: invalid request ({exc}); write hf://org/name[@revision]", secrets))
    return MergeError(_clean(f"{where}: {type(exc).__name__}: {exc}", secrets))


def _hf_http_error(exc: Any, where: str, kind: type[InputError], access: str) -> MergeError:
    """An HTTP error answer of the Hub: 429/5xx transient, 401/403 a token problem."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None and (status == 429 or status >= 500):
        return TransientError(f"{where}: the Hugging Face Hub answered HTTP {status}; retry later")
    if status in (401, 403):
        return kind(f"{where}: access denied (HTTP {status}); set HF_TOKEN to a token with "
                    f"{access} access to this repository")
    return kind(f"{where}: the Hugging Face Hub refused the request (HTTP {status}); check the "
                "repository id and options")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection/timeout exception classes of the HTTP libraries loaded in this process."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)


# --------------------------------------------------------------------------- S3 helpers


def parse_s3_ref(ref: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``) without surrounding slashes."""
    body = ref[len(S3_SCHEME):] if ref.startswith(S3_SCHEME) else ref
    bucket, _, prefix = body.partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket):
        raise SourceError(f"{ref}: not an S3 reference; write s3://bucket/prefix")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise SourceError(f"{ref}: the prefix has an empty, '.' or '..' segment; write s3://bucket/a/b")
    return bucket, prefix


def s3_key(prefix: str, name: str) -> str:
    """The object key of ``name`` in the folder ``prefix``."""
    return f"{prefix}/{name}" if prefix else name


def s3_client(endpoint_url: str | None = None, *, max_attempts: int = 5, region_name: str | None = None,
              connect_timeout: float = 10.0, read_timeout: float = 60.0) -> Any:
    """A boto3 S3 client with the standard retry mode (``max_attempts`` tries in all).

    Credentials, region and endpoint come from the standard AWS chain (environment,
    ``AWS_PROFILE``, config files, instance roles); ``endpoint_url`` overrides
    ``AWS_ENDPOINT_URL``.

    Raises:
        SourceError: the endpoint or configuration is invalid.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": max_attempts},
                    connect_timeout=connect_timeout, read_timeout=read_timeout)
    try:
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region_name,
                                              config=config)
    except ValueError as exc:
        raise SourceError(_clean(f"S3 endpoint {endpoint_url!r}: {exc}; pass a URL like "
                                 "https://host:port")) from exc


_S3_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded",
    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
    "OperationAborted", "PreconditionFailed",
}
_S3_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                        "TokenRefreshRequired"}


def s3_error(exc: BaseException, where: str, kind: type[InputError]) -> MergeError:
    """Translate a boto3/botocore error into a Mergeflow error.

    ``kind`` is the permanent class (``SourceError`` or ``SinkError``). Throttling, HTTP 5xx,
    timeouts, resets and exhausted transfer retries become :class:`TransientError`.
    """
    from botocore import exceptions as bce

    exc = _unwrap_transfer_error(exc)
    if isinstance(exc, bce.ClientError):
        return _s3_client_error(exc, where, kind)
    if isinstance(exc, (bce.HTTPClientError, bce.ConnectionError, bce.IncompleteReadError)):
        return TransientError(_clean(f"{where}: S3 connection failed ({type(exc).__name__}); "
                                     "check the endpoint and network, then retry"))
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError,
                        bce.CredentialRetrievalError)):
        return kind(f"{where}: no usable AWS credentials ({type(exc).__name__}); set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(exc, bce.NoRegionError):
        return kind(f"{where}: no AWS region configured; set AWS_DEFAULT_REGION")
    if isinstance(exc, (bce.ParamValidationError, ValueError)):
        return kind(_clean(f"{where}: invalid S3 request ({exc})"))
    if _is_retries_exceeded(exc):
        return TransientError(f"{where}: the transfer failed after its retries; retry")
    return MergeError(_clean(f"{where}: {type(exc).__name__}: {exc}"))


def _unwrap_transfer_error(exc: BaseException) -> BaseException:
    """The botocore error inside boto3's transfer wrappers (S3UploadFailedError, RetriesExceeded)."""
    from boto3.exceptions import Boto3Error

    for _ in range(5):
        if not isinstance(exc, Boto3Error) and not _is_retries_exceeded(exc):
            break
        inner = getattr(exc, "last_exception", None) or exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


def _is_retries_exceeded(exc: BaseException) -> bool:
    return type(exc).__name__ == "RetriesExceededError"


def _s3_client_error(exc: Any, where: str, kind: type[InputError]) -> MergeError:
    """An error answer of S3: sorted by its code and HTTP status."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "Unknown"))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    if code in _S3_TRANSIENT_CODES or status == 429 or status >= 500:
        return TransientError(f"{where}: S3 answered {code} (HTTP {status}) after retries; retry later")
    if code == "NoSuchBucket":
        return kind(f"{where}: the bucket does not exist; create it or fix the bucket name")
    if code in _S3_CREDENTIAL_CODES:
        return kind(f"{where}: S3 rejected the credentials ({code}); check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the session token")
    if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
        needs = "s3:ListBucket and s3:GetObject" if kind is SourceError else \
            "s3:PutObject, s3:GetObject, s3:ListBucket and s3:DeleteObject"
        return kind(f"{where}: access denied ({code}); grant these credentials {needs} on the "
                    "bucket (and kms:Decrypt / kms:GenerateDataKey for a KMS key)")
    if code in ("NoSuchKey", "404") or status == 404:
        return kind(f"{where}: not found ({code}); check the bucket and key")
    message = _clean(str(error.get("Message", "")))
    return kind(f"{where}: S3 refused the request ({code}, HTTP {status}: {message}); fix the request")


def _clean(text: str, secrets: Iterable[str | None] = ()) -> str:
    """One line, with any known secret value (environment credentials, passed tokens) masked."""
    line = " ".join(str(text).split())
    values = [os.environ.get(name) for name in _SECRET_VARS] + list(secrets)
    for value in values:
        if value and len(value) >= 4:
            line = line.replace(value, "***")
    return line


# --------------------------------------------------------------------------- S3 source


@dataclass(frozen=True)
class S3Object:
    """One object directly under a prefix, as listed."""

    name: str
    key: str
    etag: str
    size: int
    modified: float = 0.0  # LastModified, seconds since the epoch (0: not listed)


def resolve_s3(ref: str, *, allow_patterns: Sequence[str] | None = MERGE_FILE_PATTERNS,
               cache_dir: str | os.PathLike | None = None, endpoint_url: str | None = None,
               client: Any | None = None, transfer_config: Any | None = None) -> Path:
    """Mirror the merge files directly under ``s3://bucket/prefix`` into the local cache.

    An object whose ETag and size match the mirror's record is not downloaded again; a changed
    object is re-downloaded; a mirrored file whose object is gone is removed.

    Returns:
        ``<cache_dir or mergeflow cache/s3>/<bucket>/<prefix>``.

    Raises:
        SourceError: missing bucket, no objects, access denied, bad credentials.
        TransientError: throttling, HTTP 5xx, connection failures.
    """
    bucket, prefix = parse_s3_ref(ref)
    client = client or s3_client(endpoint_url)
    listed = list_s3_prefix(client, bucket, prefix, ref=ref)
    objects = [o for o in listed if _wanted(o.name, allow_patterns)]
    if allow_patterns is MERGE_FILE_PATTERNS and not any(
            fnmatch.fnmatchcase(o.name, SAFETENSORS_WEIGHTS) for o in objects):
        objects += [o for o in listed if _wanted(o.name, BIN_WEIGHT_PATTERNS)]
    if not objects:
        raise SourceError(f"{ref}: no model or adapter files directly under this prefix; check "
                          "the bucket and prefix (it must name the folder holding config.json "
                          "or adapter_config.json)")
    root = Path(cache_dir).expanduser() if cache_dir else mergeflow_cache_dir() / "s3"
    folder = root / bucket / prefix if prefix else root / bucket
    _sync_mirror(client, bucket, objects, folder, ref, transfer_config)
    _prune(folder, {o.name for o in listed})
    return folder


def list_s3_prefix(client: Any, bucket: str, prefix: str, *, ref: str | None = None,
                   page_size: int = 1000) -> list[S3Object]:
    """The objects directly under ``prefix`` (one folder level), following every page.

    Raises:
        SourceError / TransientError: as :func:`s3_error` sorts the failure.
    """
    where = ref or f"{S3_SCHEME}{bucket}/{prefix}"
    start = f"{prefix}/" if prefix else ""
    objects = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=start, Delimiter="/", PaginationConfig={"PageSize": page_size})
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"][len(start):]
                if name and name not in (".", ".."):
                    objects.append(S3Object(name, item["Key"], item.get("ETag", "").strip('"'),
                                            int(item["Size"]), _epoch(item.get("LastModified"))))
    except Exception as exc:
        raise_s3(exc, where, SourceError)
    return objects


def _epoch(when: Any) -> float:
    """A listing's LastModified (a datetime) in seconds since the epoch; 0 when absent."""
    return when.timestamp() if hasattr(when, "timestamp") else 0.0


def raise_s3(exc: Exception, where: str, kind: type[InputError]) -> NoReturn:
    """Raise the Mergeflow error for a boto3/botocore failure; re-raise any other exception."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, (BotoCoreError, ClientError, Boto3Error)) or _is_retries_exceeded(exc):
        raise s3_error(exc, where, kind) from exc
    raise exc


def _lacks_weights(folder: Path) -> bool:
    """A fetched model folder (config.json, no adapter) with no safetensors weights: its
    weights may be ``pytorch_model*.bin`` files, fetched next."""
    return ((folder / "config.json").is_file() and not (folder / "adapter_config.json").exists()
            and not any(folder.glob(SAFETENSORS_WEIGHTS)))


def _wanted(name: str, patterns: Sequence[str] | None) -> bool:
    """Whether ``name`` matches one of the glob patterns (None: every file)."""
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _sync_mirror(client: Any, bucket: str, objects: list[S3Object], folder: Path, ref: str,
                 transfer_config: Any | None) -> None:
    """Bring the mirror folder up to date with the listed objects."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(f"{folder}: cannot create the S3 cache folder ({exc.strerror}); "
                          "set MERGEFLOW_CACHE to a writable place") from exc
    state = _load_state(folder)
    fetched = fetched_bytes = 0
    for obj in objects:
        record = {"etag": obj.etag, "size": obj.size}
        if state.get(obj.name) == record and _has_size(folder / obj.name, obj.size):
            continue
        _download(client, bucket, obj, folder / obj.name, transfer_config)
        state[obj.name] = record
        _save_state(folder, state)
        fetched, fetched_bytes = fetched + 1, fetched_bytes + obj.size
    log.info("%s: %d file(s) downloaded (%d bytes), %d from the cache in %s",
             ref, fetched, fetched_bytes, len(objects) - fetched, folder)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _download(client: Any, bucket: str, obj: S3Object, dest: Path, transfer_config: Any | None) -> None:
    """Download one object to a temporary name beside ``dest`` and rename it into place."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    where = f"{S3_SCHEME}{bucket}/{obj.key}"
    try:
        client.download_file(bucket, obj.key, str(tmp), Config=transfer_config)
        if not _has_size(tmp, obj.size):
            raise TransientError(f"{where}: downloaded size differs from the listing "
                                 f"({obj.size} bytes); the object changed meanwhile, retry")
        os.replace(tmp, dest)
    except MergeError:
        raise
    except OSError as exc:
        raise SourceError(f"{dest}: cannot write the cached copy of {where} ({exc.strerror}); "
                          "free disk space or set MERGEFLOW_CACHE elsewhere") from exc
    except Exception as exc:
        raise_s3(exc, where, SourceError)
    finally:
        tmp.unlink(missing_ok=True)


def _load_state(folder: Path) -> dict[str, dict]:
    """The mirror's record of what each file was downloaded from ({name: {etag, size}})."""
    try:
        state = json.loads((folder / S3_STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _save_state(folder: Path, state: dict[str, dict]) -> None:
    """Persist the mirror's record atomically."""
    tmp = folder / f"{S3_STATE_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, folder / S3_STATE_FILE)


def _prune(folder: Path, listed: set[str]) -> None:
    """Remove mirrored files whose objects are gone from the prefix (only files this mirror wrote)."""
    state = _load_state(folder)
    gone = [name for name in state if name not in listed]
    for name in gone:
        (folder / name).unlink(missing_ok=True)
        del state[name]
    if gone:
        _save_state(folder, state)
