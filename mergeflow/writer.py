"""Streaming safetensors shard writer.

The ``safetensors`` library serializes a whole dict of tensors held in memory. A merge must not
hold a shard in memory, so this writer streams: the plan knows every tensor's name, dtype and
shape before any data exists, so the header (with all data offsets) is written first and each
tensor's bytes are appended as soon as that tensor is ready. The file is written under a
temporary name and renamed into place only when every planned tensor has been written, so a
file with the final name is always complete. The output is a standard safetensors file that
``safetensors.safe_open`` and ``from_pretrained`` read.

A full disk (ENOSPC, or EDQUOT: over quota) while writing is a
:class:`~mergeflow.errors.DiskSpaceError` naming the file and the bytes it still needed; the
temporary file is deleted, so the space it took is given back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from mergeflow import faults
from mergeflow.checkpoint import DTYPE_NAMES, DTYPES
from mergeflow.errors import DiskSpaceError, MergeError

ALIGNMENT = 8  # safetensors pads the header so tensor data starts 8-byte aligned
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
    """Write one safetensors file tensor by tensor, atomically.

    Use as a context manager; call :meth:`write` once per planned tensor, in plan order. On a
    clean exit the temporary file is fsynced and renamed to ``path``; on an exception it is
    deleted. :attr:`sha256` and :attr:`size` describe the finished file.
    """

    def __init__(self, path: Path, specs: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.specs = list(specs)
        self.header, self.sizes = build_header(self.specs)
        self._next = 0
        self._hash = hashlib.sha256()
        self.size = 0
        self.sha256 = ""
        self.total = len(self.header) + sum(self.sizes)  # the finished file's size

    def __enter__(self) -> ShardWriter:
        self._file = open(self.tmp, "wb")
        try:
            self._emit(self.header)
        except BaseException:
            self._file.close()
            self.tmp.unlink(missing_ok=True)
            raise
        return self

    def _emit(self, data: bytes | memoryview) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise self._disk_error(exc, self.total - self.size) from exc
            raise
        self._hash.update(data)
        self.size += len(data)

    def _disk_error(self, exc: OSError, missing: int) -> DiskSpaceError:
        """A full disk, as a DiskSpaceError naming the file and the bytes it still needed."""
        return DiskSpaceError(
            f"{self.path}: no space left on the device ({os.strerror(exc.errno)}) with {missing} "
            f"of this file's {self.total} bytes not yet stored; free at least {missing} more bytes "
            f"in {self.path.parent} (the whole merge needs more: see the preflight estimate) or "
            "write elsewhere, then rerun: finished groups are kept")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; its name, dtype and shape must match the plan."""
        want_name, want_dtype, want_shape = self.specs[self._next]
        got = (name, DTYPE_NAMES.get(tensor.dtype), list(tensor.shape))
        if got != (want_name, want_dtype, list(want_shape)):
            raise MergeError(
                f"{self.path.name}: expected tensor {want_name} {want_dtype}{list(want_shape)} "
                f"next, got {got[0]} {got[1]}{got[2]} (a planning bug; please report it)"
            )
        self._emit(tensor_bytes(tensor))
        self._next += 1
        faults.checkpoint("tensor-written")

    def __exit__(self, exc_type, exc, tb) -> None:
        complete = exc_type is None and self._next == len(self.specs)
        try:
            self._close(complete)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        if not complete:
            self.tmp.unlink(missing_ok=True)
            if exc_type is None:
                missing = self.specs[self._next][0]
                raise MergeError(f"{self.path.name}: closed before tensor {missing} was written")
            return
        faults.checkpoint("shard-before-rename")
        os.replace(self.tmp, self.path)
        faults.checkpoint("shard-renamed")
        self.sha256 = self._hash.hexdigest()

    def _close(self, complete: bool) -> None:
        """Flush, fsync (when complete) and close the temporary file; a full disk found by the
        flush is a DiskSpaceError. Closing an incomplete file cannot fail the merge further."""
        try:
            if complete:
                self._file.flush()
                os.fsync(self._file.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._file.close()
            if exc.errno in DISK_FULL:  # buffered bytes could not be stored: count them all
                raise self._disk_error(exc, self.total) from exc
            raise
        try:
            self._file.close()
        except OSError as exc:
            if not complete:
                return
            if exc.errno in DISK_FULL:
                raise self._disk_error(exc, self.total) from exc
            raise
