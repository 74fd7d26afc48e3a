"""How a shard's bytes reach the disk: one file written front to back, leaving nothing in the
page cache.

A merge writes each output byte once and never reads it back. :func:`open_sink` opens the file
past the page cache where the file system allows it (``O_DIRECT``, :class:`DirectSink`): each
4 MiB chunk goes from a buffer of this process straight to the disk, on a thread of its own. Else
it writes through the page cache and hands the written pages back as the disk gets them
(:class:`CachedSink`). The disk's speed is the same either way; what differs is the CPU the
kernel spends copying bytes into cache pages, writing them back and reclaiming them: per GB,
about 0.3 s of system time through the cache against 0.03 s direct, plus 0.1 s of user time for
the copy into the chunk (``bench/bench_writes.py``). A merge on a few cores is CPU-bound, so that
time is the merge's.

``O_DIRECT`` needs aligned file offsets, lengths and buffer addresses: chunks are page-aligned
buffers of :data:`CHUNK` bytes, and the last one is written padded to :data:`ALIGN` and the file
then cut to its size. Where the flag does not exist (not Linux), is refused at open (tmpfs
before Linux 6.6, some FUSE file systems) or by a write, the file is written through the page
cache instead. ``MERGEFLOW_DIRECT_WRITES=0`` turns the direct route off (a network file system
where direct writes are slow).

A sink is driven by one thread (the shard writer's): :meth:`write` appends bytes, :meth:`finish`
makes the file durable (the last writes, then ``fsync``), :meth:`close` closes it, finished or
not. Errors are the kernel's ``OSError`` (ENOSPC included); the direct route raises a failed
write at the next call, or at :meth:`finish`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Protocol

from mergeflow.storage.durable import drop_cached, release_written, start_writeback

ALIGN = 4096  # O_DIRECT's alignment of offsets, lengths and addresses (any disk's block size)
CHUNK = 4 * 2**20  # bytes per direct write: 2.4 GB/s here, the disk's full speed
BUFFERS = 2  # chunks per direct sink: one filling while the other is written
DIRECT_WRITES = "MERGEFLOW_DIRECT_WRITES"  # "0": always write through the page cache
# Dirty bytes after which the cached route starts the disk writing them (not waiting): the
# fsync that finishes a file then flushes at most this much. The window before, on the disk by
# then, leaves the page cache (storage.durable.release_written), so a file holds at most two
# windows of it however large it is.
WRITEBACK_BYTES = 64 * 2**20


def pwrite(fd: int, data: memoryview, offset: int) -> int:
    """``os.pwrite``: every byte a sink stores passes here (a test stands a full disk in)."""
    return os.pwrite(fd, data, offset)


def fsync(fd: int) -> None:
    """``os.fsync``, looked up when called (a power-cut test journals every fsync)."""
    os.fsync(fd)


class Sink(Protocol):
    """A file being written front to back (see the module docstring)."""

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``."""

    def finish(self) -> None:
        """Store every byte and fsync the file."""

    def close(self) -> None:
        """Close the file (after :meth:`finish`, or to abandon it)."""


def open_sink(path: Path) -> Sink:
    """Create (or truncate) ``path`` and return its sink: direct where the file system allows,
    else through the page cache (see the module docstring)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    direct = getattr(os, "O_DIRECT", 0)
    if direct and os.environ.get(DIRECT_WRITES, "1") != "0":
        try:
            return DirectSink(os.open(path, flags | direct, 0o666))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return CachedSink(os.open(path, flags, 0o666))


def _write_at(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset`` (a short write continues where it stopped)."""
    while view:
        n = pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"the write at byte {offset} stored nothing")
        view = view[n:]
        offset += n


class CachedSink:
    """Writes through the page cache: every :data:`WRITEBACK_BYTES` the disk is asked to write
    what is dirty, and the window before (on the disk by then) leaves the cache."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._written = self._flushed = self._released = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        _write_at(self._fd, view, self._written)
        self._written += len(view)
        if self._written - self._flushed >= WRITEBACK_BYTES:  # the disk writes while we merge on
            start_writeback(self._fd, self._flushed, self._written - self._flushed)
            release_written(self._fd, self._released, self._flushed - self._released)
            self._released, self._flushed = self._flushed, self._written

    def finish(self) -> None:
        fsync(self._fd)
        drop_cached(self._fd)  # written once, not read again here

    def close(self) -> None:
        os.close(self._fd)


class DirectSink:
    """Writes past the page cache (``O_DIRECT``): bytes are copied into page-aligned chunks, and
    a thread writes each full chunk while the next one fills."""

    def __init__(self, fd: int, chunk: int = CHUNK) -> None:
        if chunk <= 0 or chunk % ALIGN:
            raise ValueError(f"chunk {chunk}: must be a positive multiple of {ALIGN}")
        self._fd = fd
        self._chunk = chunk
        self._buffers = [mmap.mmap(-1, chunk) for _ in range(BUFFERS)]  # page-aligned
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for buffer in self._buffers[1:]:
            self._free.put(buffer)
        self._filling, self._filled = self._buffers[0], 0
        self._offset = 0  # where the chunk being filled goes in the file
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._direct = True
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="direct writes", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        self._raise_pending()
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), self._chunk - self._filled)
            self._filling[self._filled:self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == self._chunk:
                self._submit(self._chunk)

    def finish(self) -> None:
        """The last chunk padded to :data:`ALIGN` with zeros, every write waited for, the file
        cut to its size, then fsynced."""
        size = self._offset + self._filled
        if self._filled:
            padded = -(-self._filled // ALIGN) * ALIGN
            self._filling[self._filled:padded] = bytes(padded - self._filled)
            self._submit(padded)
        self._stop()
        self._raise_pending()
        os.ftruncate(self._fd, size)
        fsync(self._fd)
        if not self._direct:
            drop_cached(self._fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop()
        try:
            os.close(self._fd)
        finally:
            for buffer in self._buffers:
                with contextlib.suppress(BufferError):  # a view kept by an error's traceback
                    buffer.close()

    def _submit(self, length: int) -> None:
        self._todo.put((self._filling, self._offset, length))
        self._offset += length
        self._filling, self._filled = self._free.get(), 0  # waits while both are being written
        self._raise_pending()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the writing thread -----------------------------------------------------------------

    def _drain(self) -> None:
        """Write queued chunks in order; after an error, only hand the buffers back."""
        while (item := self._todo.get()) is not None:
            buffer, offset, length = item
            try:
                if self._error is None:
                    with memoryview(buffer) as whole:
                        self._write_chunk(whole[:length], offset)
            except BaseException as exc:  # raised to the caller at its next call
                self._error = exc
            finally:
                self._free.put(buffer)

    def _write_chunk(self, view: memoryview, offset: int) -> None:
        try:
            _write_at(self._fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
            # the file system took O_DIRECT at open but refuses the write: the rest of this
            # file goes through the page cache (fsync still makes it durable; finish drops it)
            fcntl.fcntl(self._fd, fcntl.F_SETFL,
                        fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._direct = False
            _write_at(self._fd, view, offset)
