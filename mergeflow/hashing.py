"""sha256 of files, remembered by (path, size, mtime) so unchanged inputs are hashed once."""

from __future__ import annotations

import hashlib
import json
import os
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
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self.entries:
            self.entries[key] = sha256_file(path)
            self._dirty = True
        return self.entries[key]

    def save(self) -> None:
        """Persist the memo (atomically); a failure to write it only costs a rehash."""
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        except OSError:
            pass


def fingerprint_files(folder: Path, names: list[str], cache: HashCache) -> dict[str, str]:
    """sha256 of each named file of a folder that exists, in name order."""
    return {n: cache.sha256(folder / n) for n in sorted(names) if (folder / n).is_file()}
