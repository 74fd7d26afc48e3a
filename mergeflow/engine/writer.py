"""Streaming safetensors shard writer.

The ``safetensors`` library serializes a whole dict of tensors held in memory. A merge must not
hold a shard - or even one tensor - in memory, so this writer streams: the plan knows every
tensor's name, dtype and shape before any data exists, so the header (with all data offsets) is
written first and each tensor's bytes are appended block by block as they are produced. The file
is written under a temporary name, fsynced, renamed into place and its folder fsynced only when
every planned tensor has been written, so a file with the final name is always complete and
durable. The output is a standard safetensors file that ``safe_open`` and ``from_pretrained`` read.

Writing and hashing run on a background thread (``hashlib`` and the writes release the GIL),
so they overlap the merge math of the next block; a bounded queue keeps at most ``depth`` blocks
in flight. The sha256 of the file comes out of the same pass: no byte is read back to hash it.
The bytes reach the disk through a :mod:`mergeflow.storage.sink`: past the page cache where the
file system allows it.

A full disk (ENOSPC, or EDQUOT: over quota) while writing is a
:class:`~mergeflow.errors.DiskSpaceError` naming the file and the bytes it still needed; the
temporary file is deleted, so the space it took is given back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mergeflow import faults
from mergeflow.errors import DISK_FULL, DiskSpaceError, MergeError, disk_full_message
from mergeflow.model.checkpoint import DTYPE_NAMES, DTYPES
from mergeflow.storage.durable import fsync_dir
from mergeflow.storage.sink import open_sink
from mergeflow.storage.staging import partial_path

ALIGNMENT = 8  # safetensors pads the header so tensor data starts 8-byte aligned


def build_header(specs: Sequence[tuple[str, str, Sequence[int]]]) -> tuple[bytes, list[int]]:
    """Build the safetensors header for tensors written in the given order.

    Args:
        specs: ``(name, safetensors dtype, shape)`` per tensor, in file order.

    Returns:
        The header bytes (length prefix included) and each tensor's data size in bytes.
    """
    table: dict[str, object] = {"__metadata__": {"format": "pt"}}
    sizes, offset = [], 0
    for name, dtype, shape in specs:
        numel = 1
        for d in shape:
            numel *= int(d)
        size = numel * DTYPES[dtype].itemsize
        table[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        sizes.append(size)
        offset += size
    body = json.dumps(table, separators=(",", ":")).encode()
    body += b" " * (-len(body) % ALIGNMENT)
    return struct.pack("<Q", len(body)) + body, sizes


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without an extra copy when contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class ShardWriter:
    """Write one safetensors file block by block, atomically and durably.

    Use as a context manager. For each planned tensor, in plan order, either call
    :meth:`write` with the whole tensor, or :meth:`begin` it and :meth:`append` its bytes in
    blocks (CPU tensors, or any buffer), then :meth:`end`. :meth:`copy_from` appends bytes read
    straight from another file (a pass-through tensor, never decoded). On a clean exit the file
    is fsynced, renamed to ``path`` and its folder fsynced; on an exception it is deleted.
    :attr:`sha256` and :attr:`size` describe the finished file.

    """

    def __init__(self, path: Path, specs: Sequence[tuple[str, str, Sequence[int]]], *,
                 depth: int = 3) -> None:
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.specs = list(specs)
        self.header, self.sizes = build_header(self.specs)
        self._next = 0
        self._open: int | None = None  # bytes still expected for the tensor begun, or None
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self.size = 0  # bytes handed to the writer thread
        self.sha256 = ""
        self.total = len(self.header) + sum(self.sizes)  # the finished file's size

    def __enter__(self) -> ShardWriter:
        self._sink = open_sink(self.tmp)
        self._thread = threading.Thread(target=self._drain, name=f"write {self.path.name}",
                                        daemon=True)
        self._thread.start()
        try:
            self._put(self.header, len(self.header))
        except BaseException:
            self._stop()
            self._sink.close()
            self.tmp.unlink(missing_ok=True)
            raise
        return self

    # -- the writer thread ------------------------------------------------------------------

    def _drain(self) -> None:
        """Write and hash queued blocks in order; after an error, only consume the queue."""
        written = 0
        while True:
            item = self._queue.get()
            if item is None:
                return
            data, ready, release = item
            if self._error is not None:
                if release is not None:
                    release()
                continue
            try:
                if ready is not None:
                    ready.synchronize()  # a device-to-host copy still in flight
                view = data if isinstance(data, memoryview | bytes) else tensor_bytes(data)
                self._sink.write(view)
                self._hash.update(view)
                written += len(view)
            except BaseException as exc:  # handed to the producer at its next call
                self._error = self._disk_error(exc, self.total - written) \
                    if isinstance(exc, OSError) and exc.errno in DISK_FULL else exc
            finally:
                if release is not None:
                    release()

    # -- the producer side ------------------------------------------------------------------

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _put(self, data: bytes | memoryview | torch.Tensor, nbytes: int, ready: object = None,
             release: Callable[[], None] | None = None) -> None:
        self._raise_pending()
        self._queue.put((data, ready, release))
        self.size += nbytes

    def _disk_error(self, exc: OSError, missing: int) -> DiskSpaceError:
        """A full disk, as a DiskSpaceError naming the file and the bytes it still needed."""
        return DiskSpaceError(disk_full_message(
            self.path, exc.errno, f" with {missing} of this file's {self.total} bytes not yet "
            "stored", kept=f"free at least {missing} more bytes in {self.path.parent} (the whole "
            "merge needs more: see the preflight estimate) or write elsewhere, then rerun: "
            "finished groups are kept"))

    def begin(self, name: str, dtype: str, shape: Sequence[int]) -> None:
        """Start the next planned tensor; its name, dtype and shape must match the plan."""
        if self._open is not None or self._next >= len(self.specs):
            where = self.specs[self._next - 1][0] if self._open is not None else "the last one"
            raise MergeError(f"{self.path.name}: tensor {name} begun before {where} was ended "
                             "(a planning bug; please report it)")
        want_name, want_dtype, want_shape = self.specs[self._next]
        if (name, dtype, list(shape)) != (want_name, want_dtype, list(want_shape)):
            raise MergeError(
                f"{self.path.name}: expected tensor {want_name} {want_dtype}{list(want_shape)} "
                f"next, got {name} {dtype}{list(shape)} (a planning bug; please report it)")
        self._open = self.sizes[self._next]
        self._next += 1

    def append(self, block: torch.Tensor | bytes | memoryview, ready: object = None,
               release: Callable[[], None] | None = None) -> None:
        """Append bytes of the tensor begun last. A CPU tensor block is written as its raw
        little-endian bytes; the caller must not change it until ``release`` is called (from
        the writer thread, once the block is written), or ever when no ``release`` is given.
        ``ready`` (a CUDA event) is waited for by the writer thread before it reads the block."""
        if isinstance(block, torch.Tensor):
            block = block.detach()
            if block.device.type != "cpu":
                raise MergeError("ShardWriter.append takes CPU tensors (copy the block to the "
                                 "host first)")
            block = block.contiguous()
        nbytes = len(block) if isinstance(block, bytes | memoryview) else _nbytes(block)
        if self._open is None or nbytes > self._open:
            name = self.specs[self._next - 1][0] if self._next else "?"
            raise MergeError(f"{self.path.name}: {nbytes} more bytes than planned for {name} "
                             "(a planning bug; please report it)")
        self._put(block, nbytes, ready, release)
        self._open -= nbytes

    def end(self) -> None:
        """Finish the tensor begun last; every planned byte of it must have been appended."""
        if self._open:
            name = self.specs[self._next - 1][0]
            raise MergeError(f"{self.path.name}: tensor {name} ended {self._open} bytes short "
                             "(a planning bug; please report it)")
        self._open = None
        faults.checkpoint("tensor-written")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor whole; its name, dtype and shape must match the plan."""
        self.begin(name, DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), list(tensor.shape))
        self.append(tensor.detach().to("cpu"))
        self.end()

    def copy_from(self, read: Callable[[int, memoryview], None], nbytes: int,
                  block_bytes: int) -> None:
        """Append ``nbytes`` bytes of the tensor begun last, read by ``read(start, buffer)``
        block by block: a pass-through tensor is copied as stored bytes, never decoded."""
        start = 0
        while start < nbytes:
            n = min(block_bytes, nbytes - start)
            buffer = bytearray(n)
            read(start, memoryview(buffer))
            self.append(memoryview(buffer))
            start += n

    def _stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop()
        complete = exc_type is None and self._error is None and self._next == len(self.specs) \
            and self._open is None
        try:
            self._close(complete)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        if not complete:
            self.tmp.unlink(missing_ok=True)
            if exc_type is None:
                self._raise_pending()
                missing = self.specs[min(self._next, len(self.specs) - 1)][0]
                raise MergeError(f"{self.path.name}: closed before tensor {missing} was written")
            return
        faults.checkpoint("shard-before-rename")
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        faults.checkpoint("shard-renamed")
        self.sha256 = self._hash.hexdigest()

    def _close(self, complete: bool) -> None:
        """Store the last bytes and fsync (when complete), then close the temporary file; a full
        disk found then is a DiskSpaceError. Closing an incomplete file cannot fail the merge
        further."""
        try:
            if complete:
                self._sink.finish()
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._sink.close()
            if exc.errno in DISK_FULL:  # buffered bytes could not be stored: count them all
                raise self._disk_error(exc, self.total) from exc
            raise
        try:
            self._sink.close()
        except OSError as exc:
            if not complete:
                return
            if exc.errno in DISK_FULL:
                raise self._disk_error(exc, self.total) from exc
            raise


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
