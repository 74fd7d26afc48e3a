"""Find finished adapters in a local folder or an S3 prefix, and whether their merge exists.

Layout: one folder per adapter directly under the watched location
(``<location>/<name>/adapter_config.json``). A folder counts as finished when it holds
``adapter_config.json``, the weights (``adapter_model.safetensors`` or ``adapter_model.bin``) and
a completion marker: ``_COMPLETE`` (an empty file the trainer writes last), or the final
``trainer_state.json`` that ``Trainer.save_state()`` writes after training. Folders named
``checkpoint-*`` (the Trainer's intermediate checkpoints, which also hold a trainer_state.json),
hidden folders and names starting with ``_`` are never merged.

Each finished adapter gets a fingerprint: the sha256 of its location plus the sha256 (local) or
ETag (S3) of its config and weights. A retrained adapter therefore gets a new fingerprint, and
an unchanged one the same fingerprint on every scan. It also gets the time it finished: the
newest modification time (local) or LastModified (S3) of its config, weights and marker.

For the watcher's window (several adapters of one base in one run), :func:`adapter_base` reads
the base an adapter's config names and :func:`group_by_base` groups the adapters by it
(:class:`AdapterGroup`: when it is ready, and its run's idempotency key).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergeflow.errors import SinkError, SourceError
from mergeflow.pipeline import (
    HF_SCHEME,
    MANIFEST,
    S3_SCHEME,
    HashCache,
    list_s3_prefix,
    parse_hf_ref,
    parse_s3_ref,
    raise_s3,
    read_manifest,
    s3_client,
    s3_key,
)

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MARKERS = ("_COMPLETE", "trainer_state.json")


@dataclass(frozen=True)
class FinishedAdapter:
    """A finished adapter found by a scan."""

    name: str  # its folder name: the name of its output
    ref: str  # a local path or s3://bucket/prefix
    fingerprint: str  # sha256 over the location and its files' sha256 / ETags
    finished_at: float = 0.0  # seconds since the epoch: its newest config/weights/marker

    @property
    def key(self) -> str:
        """The idempotency key of its merge run."""
        return f"mergeflow-watch:{self.fingerprint}"


@dataclass(frozen=True)
class AdapterGroup:
    """Finished adapters of one base, merged in one run once the newest is old enough."""

    base: str | None  # what their configs (or the watcher's options) name; None: unknown
    adapters: tuple[FinishedAdapter, ...]  # by name

    @property
    def newest(self) -> float:
        """When the group's newest adapter finished (seconds since the epoch)."""
        return max(a.finished_at for a in self.adapters)

    def ready(self, now: float, window_seconds: float) -> bool:
        """Whether no adapter of the group finished within the last ``window_seconds``."""
        return now - self.newest >= window_seconds

    @property
    def key(self) -> str:
        """The idempotency key of the group's run: one adapter's own key (a group of one is
        its single merge), else the sha256 of the sorted fingerprints."""
        if len(self.adapters) == 1:
            return self.adapters[0].key
        joined = ",".join(sorted(a.fingerprint for a in self.adapters))
        return f"mergeflow-watch-batch:{hashlib.sha256(joined.encode()).hexdigest()}"


def is_finished(names: set[str], markers: Sequence[str] = MARKERS) -> bool:
    """Whether a folder holding these file names is a finished adapter."""
    return CONFIG in names and any(w in names for w in WEIGHTS) and any(m in names for m in markers)


def skipped(name: str) -> bool:
    """Folder names never merged: hidden, ``_``-prefixed, Trainer checkpoints."""
    return name.startswith((".", "_", "checkpoint-"))


def fingerprint(ref: str, files: dict[str, str]) -> str:
    """sha256 of the location and the per-file digests (sorted, so order does not matter)."""
    text = json.dumps({"ref": ref, "files": dict(sorted(files.items()))}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _identity_files(names: set[str]) -> list[str]:
    return [CONFIG, *(w for w in WEIGHTS if w in names)]


def _dated_files(names: set[str], markers: Sequence[str]) -> list[str]:
    """The files whose times say when an adapter finished: config, weights, markers."""
    return [*_identity_files(names), *(m for m in markers if m in names)]


def find_local(root: Path, markers: Sequence[str] = MARKERS,
               cache: HashCache | None = None) -> list[FinishedAdapter]:
    """The finished adapters directly under a local folder, by name.

    Raises:
        SourceError: ``root`` is not a folder.
    """
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder; watch a folder that holds one folder per adapter")
    cache = cache or HashCache()
    found = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or skipped(child.name):
            continue
        names = {p.name for p in child.iterdir() if p.is_file()}
        if is_finished(names, markers):
            ref = str(child.resolve())
            hashes = {n: cache.sha256(child / n) for n in _identity_files(names)}
            done = max((child / n).stat().st_mtime for n in _dated_files(names, markers))
            found.append(FinishedAdapter(child.name, ref, fingerprint(ref, hashes), done))
    cache.save()
    return found


def list_s3_folders(client: Any, bucket: str, prefix: str) -> list[str]:
    """The "sub-folder" prefixes directly under ``prefix`` (without trailing slash)."""
    start = f"{prefix}/" if prefix else ""
    folders = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=start, Delimiter="/")
        for page in pages:
            folders += [p["Prefix"].rstrip("/") for p in page.get("CommonPrefixes", [])]
    except Exception as exc:
        raise_s3(exc, f"{S3_SCHEME}{bucket}/{prefix}", SourceError)
    return sorted(folders)


def find_s3(ref: str, markers: Sequence[str] = MARKERS, client: Any | None = None,
            endpoint_url: str | None = None) -> list[FinishedAdapter]:
    """The finished adapters directly under ``s3://bucket/prefix``, by name.

    Raises:
        SourceError / TransientError: listing failed (as :func:`mergeflow.remote.fetch.s3_error`).
    """
    bucket, prefix = parse_s3_ref(ref)
    client = client or s3_client(endpoint_url)
    found = []
    for folder in list_s3_folders(client, bucket, prefix):
        name = folder.rsplit("/", 1)[-1]
        if skipped(name):
            continue
        objects = {o.name: o for o in list_s3_prefix(client, bucket, folder)}
        if is_finished(set(objects), markers):
            where = f"{S3_SCHEME}{bucket}/{folder}"
            etags = {n: objects[n].etag for n in _identity_files(set(objects))}
            done = max(objects[n].modified for n in _dated_files(set(objects), markers))
            found.append(FinishedAdapter(name, where, fingerprint(where, etags), done))
    return found


def find_finished(location: str, markers: Sequence[str] = MARKERS, client: Any | None = None,
                  endpoint_url: str | None = None) -> list[FinishedAdapter]:
    """The finished adapters under a local folder or an ``s3://`` prefix."""
    if location.startswith(S3_SCHEME):
        return find_s3(location, markers, client, endpoint_url)
    if "://" in location:
        raise SourceError(f"{location}: watch a local folder or an s3://bucket/prefix")
    return find_local(Path(location).expanduser(), markers)


def join_ref(root: str, name: str) -> str:
    """``root/name`` for a folder, ``hf://org`` or ``s3://bucket/prefix`` root."""
    return f"{root.rstrip('/')}/{name}"


def merged_already(name: str, out_root: str, push_root: str | None = None,
                   client: Any | None = None, endpoint_url: str | None = None) -> bool:
    """Whether the merge of adapter ``name`` is finished: its published manifest exists
    (``<push_root>/<name>/merge-manifest.json``) when publishing, else the output folder's
    (``<out_root>/<name>``).

    Raises:
        SinkError / TransientError: the S3 check failed.
    """
    if not push_root:
        return read_manifest(Path(out_root).expanduser() / name) is not None
    dest = join_ref(push_root, name)
    if dest.startswith(S3_SCHEME):
        return _s3_manifest_exists(dest, client or s3_client(endpoint_url))
    if dest.startswith(HF_SCHEME):
        return _hf_manifest_exists(dest)
    raise SinkError(f"{push_root}: publish to hf://org or s3://bucket/prefix")


def _s3_manifest_exists(dest: str, client: Any) -> bool:
    bucket, prefix = parse_s3_ref(dest)
    try:
        client.head_object(Bucket=bucket, Key=s3_key(prefix, MANIFEST))
    except Exception as exc:
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404:
            return False
        raise_s3(exc, join_ref(dest, MANIFEST), SinkError)
    return True


def _hf_manifest_exists(dest: str) -> bool:
    """Whether the Hub repo holds a manifest; an unreachable Hub counts as "not yet" (the
    run's idempotency key still prevents a second merge)."""
    from huggingface_hub import HfApi

    repo_id, revision = parse_hf_ref(dest)
    try:
        return HfApi().file_exists(repo_id, MANIFEST, revision=revision)
    except Exception:
        return False


def adapter_base(adapter: FinishedAdapter, client: Any | None = None,
                 endpoint_url: str | None = None) -> str | None:
    """The base the adapter's ``adapter_config.json`` names (``base_model_name_or_path``);
    None when it names none or the config cannot be read as JSON.

    Raises:
        TransientError: S3 failed in a way worth retrying.
    """
    try:
        config = json.loads(_read_config(adapter.ref, client, endpoint_url))
    except (OSError, ValueError, SourceError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(base) if base else None


def _read_config(ref: str, client: Any | None, endpoint_url: str | None) -> bytes:
    """The bytes of the adapter's config, from its folder or its S3 prefix."""
    if not ref.startswith(S3_SCHEME):
        return (Path(ref) / CONFIG).read_bytes()
    bucket, prefix = parse_s3_ref(ref)
    client = client or s3_client(endpoint_url)
    try:
        return client.get_object(Bucket=bucket, Key=s3_key(prefix, CONFIG))["Body"].read()
    except Exception as exc:
        raise_s3(exc, join_ref(ref, CONFIG), SourceError)


def group_by_base(adapters: Sequence[FinishedAdapter], bases: Sequence[str | None]
                  ) -> list[AdapterGroup]:
    """The adapters grouped by their base (``bases``, in the adapters' order), each group by
    name; an adapter whose base is unknown (None) is a group of its own."""
    groups: dict[str, list[FinishedAdapter]] = {}
    alone: list[AdapterGroup] = []
    for adapter, base in zip(adapters, bases, strict=True):
        if base is None:
            alone.append(AdapterGroup(None, (adapter,)))
        else:
            groups.setdefault(base, []).append(adapter)
    together = [AdapterGroup(base, tuple(sorted(members, key=lambda a: a.name)))
                for base, members in groups.items()]
    return sorted(together + alone, key=lambda g: g.adapters[0].name)
