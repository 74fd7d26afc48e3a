"""Durable file writes: the one way Mergeflow makes a file appear whole, even across a power cut.

A rename is atomic, but not durable on its own: after a power cut the new name may point at a
file whose data never reached the disk, or the rename itself may be lost. So every file that
another step trusts is written under a temporary name, fsynced, renamed into place, and then
its directory is fsynced, in that order. :func:`atomic_write` does this for small files;
the shard writer (:mod:`mergeflow.engine.writer`) does the same for shards with :func:`fsync_dir`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from mergeflow import faults

_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages, do not wait


def _load_sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` dirty bytes of ``fd`` from ``offset`` to the
    disk now, without waiting (``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so the final fsync
    finds little left to flush. Durability still comes from that fsync; where the call does not
    exist (not Linux) or fails, this does nothing."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


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
