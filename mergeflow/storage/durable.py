"""Durable file writes: the one way Mergeflow makes a file appear whole, even across a power cut.

A rename is atomic, but not durable on its own: after a power cut the new name may point at a
file whose data never reached the disk, or the rename itself may be lost. So every file that
another step trusts is written under a temporary name, fsynced, renamed into place, and then
its directory is fsynced, in that order. :func:`atomic_write` does this for small files;
the shard writer (:mod:`mergeflow.engine.writer`) does the same for shards with :func:`fsync_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergeflow import faults


def fsync_dir(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename into it, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file written by other means (a copy, ``write_text``) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of
    ``data``, durably: temporary file, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        faults.checkpoint("atomic-before-rename")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def durable_rename(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` (files or folders) and fsync both parents, so the move survives
    a power cut."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
    if Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)
