"""Small JSON answers remembered in the Mergeflow cache folder (``$MERGEFLOW_CACHE/<kind>/``).

Used for facts that are expensive to work out because only transformers knows them (a model's
layout, a tokenizer's length) but that are fixed by their inputs. Every entry is keyed by a hash
of everything that determines it; a missing, unreadable or damaged entry reads as "not cached",
and writing is atomic and best-effort (a read-only cache only costs time).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from mergeflow.storage.hashing import cache_dir


def installed_version(package: str) -> str | None:
    """A package's installed version, read from its metadata (the package is not imported)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def memo_path(kind: str, key: dict[str, Any]) -> Path:
    """The cache file of ``key`` (any JSON-able dict) among the entries of ``kind``."""
    from mergeflow.version import __version__

    blob = json.dumps({**key, "mergeflow": __version__}, sort_keys=True, separators=(",", ":"))
    return cache_dir() / kind / f"{hashlib.sha256(blob.encode()).hexdigest()}.json"


def read_memo(path: Path) -> dict[str, Any] | None:
    """The JSON object stored at ``path``, or None (absent, unreadable, not an object)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_memo(path: Path, data: dict[str, Any]) -> None:
    """Store ``data`` at ``path`` atomically; failures are ignored."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
