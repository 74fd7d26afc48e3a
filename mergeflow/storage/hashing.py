"""sha256 of files, remembered by (path, size, mtime) so unchanged inputs are hashed once.

Three ways to know a file's sha256 without hashing it on the critical path:

* the Hugging Face cache names every LFS blob by its sha256 (``blobs/<64 hex>``), so a file
  that resolves there is never read to be hashed;
* :class:`HashCache` remembers hashes by resolved path, size and mtime;
* :func:`prefetch` hashes files on a background thread (``hashlib`` releases the GIL) while
  the merge runs; :meth:`HashCache.sha256` then waits for that result instead of reading the
  file a second time.

Merge plans identify their inputs by :func:`file_identity` (size and mtime, the same trust
the memo places in them), so planning never waits for a hash; the manifest still lists every
input's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

CHUNK = 8 * 2**20


def cache_dir() -> Path:
    """Mergeflow's cache folder: ``$MERGEFLOW_CACHE``, else ``~/.cache/mergeflow``."""
    return Path(os.environ.get("MERGEFLOW_CACHE", Path.home() / ".cache" / "mergeflow"))


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_BLOB = re.compile(r"[0-9a-f]{64}")
_lock = threading.Lock()
_known: dict[str, str] = {}  # memo key -> sha256, computed by this process
_pending: dict[str, threading.Event] = {}  # memo key -> set when its hash is in _known


def known_sha256(path: Path) -> str | None:
    """The sha256 a content-addressed store already names the file by: a Hugging Face cache
    LFS blob (``.../blobs/<sha256>``; smaller files' blobs are named by their git sha1)."""
    real = Path(path).resolve()
    return real.name if real.parent.name == "blobs" and _BLOB.fullmatch(real.name) else None


def file_identity(path: Path) -> str:
    """What a plan records about an input file: its size and mtime (ns), or its sha256 when a
    content-addressed cache names it so. Stable across runs, and free to compute."""
    known = known_sha256(path)
    if known is not None:
        return f"sha256:{known}"
    st = Path(path).stat()
    return f"size:{st.st_size},mtime_ns:{st.st_mtime_ns}"


def _memo_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def prefetch(paths: Iterable[Path]) -> threading.Thread:
    """Hash ``paths`` on a daemon thread, into this process's memo (and the on-disk one)."""
    todo = []
    with _lock:
        for path in paths:
            key = _memo_key(path)
            if key not in _known and key not in _pending:
                _pending[key] = threading.Event()
                todo.append((path, key))

    def run() -> None:
        cache = HashCache()
        for path, key in todo:
            try:
                digest = cache.entries.get(key) or known_sha256(path) or sha256_file(path)
                cache.entries[key] = digest
                cache._dirty = True
                with _lock:
                    _known[key] = digest
            except OSError:
                pass  # the caller hashes it itself (and sees the error)
            finally:
                with _lock:
                    event = _pending.pop(key, None)
                if event is not None:
                    event.set()
        cache.save()

    thread = threading.Thread(target=run, name="mergeflow-prefetch-hashes", daemon=True)
    thread.start()
    return thread


class HashCache:
    """A small JSON memo of file hashes keyed by resolved path, size and mtime."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "sha256.json"
        try:
            self.entries: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self._dirty = False

    def sha256(self, path: Path) -> str:
        """The file's sha256, from the memo when its size and mtime are unchanged."""
        key = _memo_key(path)
        if key in self.entries:
            return self.entries[key]
        with _lock:
            event = _pending.get(key)
        if event is not None:
            event.wait()
        with _lock:
            digest = _known.get(key)
        if digest is None:
            digest = known_sha256(path) or sha256_file(path)
        self.entries[key] = digest
        self._dirty = True
        return digest

    def save(self) -> None:
        """Persist the memo (atomically); a failure to write it only costs a rehash."""
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:
            pass


def fingerprint_files(folder: Path, names: list[str], cache: HashCache) -> dict[str, str]:
    """sha256 of each named file of a folder that exists, in name order."""
    return {n: cache.sha256(folder / n) for n in sorted(names) if (folder / n).is_file()}


def identify_files(folder: Path, names: list[str]) -> dict[str, str]:
    """:func:`file_identity` of each named file of a folder that exists, in name order."""
    return {n: file_identity(folder / n) for n in sorted(names) if (folder / n).is_file()}
