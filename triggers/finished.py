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
an unchanged one the same fingerprint on every scan.
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

    @property
    def key(self) -> str:
        """The idempotency key of its merge run."""
        return f"mergeflow-watch:{self.fingerprint}"


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
            found.append(FinishedAdapter(child.name, ref, fingerprint(ref, hashes)))
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
            found.append(FinishedAdapter(name, where, fingerprint(where, etags)))
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
