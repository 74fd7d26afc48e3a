"""Durable file writes: the one way Mergeflow makes a file appear whole, even across a power cut.

A rename is atomic, but not durable on its own: after a power cut the new name may point at a
file whose data never reached the disk, or the rename itself may be lost. So every file that
another step trusts is written under a temporary name, fsynced, renamed into place, and then
its directory is fsynced, in that order. :func:`atomic_write` does this for small files;
the shard writer (:mod:`mergeflow.engine.writer`) does the same for shards with :func:`fsync_dir`.
Where a shard is written through the page cache (:class:`mergeflow.storage.sink.CachedSink`),
:func:`start_writeback` and :func:`release_written` have the disk write it while it is merged and
let its pages leave the cache once they are on the disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from mergeflow import faults

# <fcntl.h>'s sync_file_range flags
_SYNC_FILE_RANGE_WAIT_BEFORE = 1  # wait for writeback already under way in the range
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages, do not wait
_SYNC_FILE_RANGE_WAIT_AFTER = 4  # wait for the range's writeback to finish
_WRITTEN = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP}


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


def release_written(fd: int, offset: int, nbytes: int) -> None:
    """Wait until ``nbytes`` bytes of ``fd`` from ``offset`` have been written to the disk, then
    drop them from the page cache (``sync_file_range`` + ``POSIX_FADV_DONTNEED``).

    A merge writes each byte once and does not read it again, but the kernel keeps every written
    page cached until memory runs short, then pays to reclaim them: writing four 1.7 GB files
    cost 7.6 to 13.6 s of system time with the pages kept and 1.6 to 1.9 s with each 64 MiB
    dropped once on the disk (``docs/benchmarks.md``). Durability still comes from the final
    fsync. Where the calls do not exist (not Linux) or the file system does not support them,
    this does nothing.

    Raises:
        OSError: the disk failed writing the range (the error is reported here and not again by
            the fsync, so it must not be lost).
    """
    if nbytes <= 0:  # sync_file_range reads 0 as "to the end of the file"
        return
    if _sync_file_range is not None and _sync_file_range(fd, offset, nbytes, _WRITTEN) != 0:
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, os.strerror(code))
        return
    drop_cached(fd, offset, nbytes)


def drop_cached(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Drop the clean cached pages of ``fd`` (from ``offset``, ``nbytes`` of them; 0: to the
    end) from the page cache; a no-op where ``posix_fadvise`` does not exist."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


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
