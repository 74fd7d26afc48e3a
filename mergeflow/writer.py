"""Streaming safetensors shard writer.

The ``safetensors`` library serializes a whole dict of tensors held in memory. A merge must not
hold a shard in memory, so this writer streams: the plan knows every tensor's name, dtype and
shape before any data exists, so the header (with all data offsets) is written first and each
tensor's bytes are appended as soon as that tensor is ready. The file is written under a
temporary name and renamed into place only when every planned tensor has been written, so a
file with the final name is always complete. The output is a standard safetensors file that
``safetensors.safe_open`` and ``from_pretrained`` read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from mergeflow.checkpoint import DTYPE_NAMES, DTYPES
from mergeflow.errors import MergeError

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

    def __enter__(self) -> ShardWriter:
        self._file = open(self.tmp, "wb")
        self._emit(self.header)
        return self

    def _emit(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

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

    def __exit__(self, exc_type, exc, tb) -> None:
        complete = exc_type is None and self._next == len(self.specs)
        try:
            if complete:
                self._file.flush()
                os.fsync(self._file.fileno())
        finally:
            self._file.close()
        if not complete:
            self.tmp.unlink(missing_ok=True)
            if exc_type is None:
                missing = self.specs[self._next][0]
                raise MergeError(f"{self.path.name}: closed before tensor {missing} was written")
            return
        os.replace(self.tmp, self.path)
        self.sha256 = self._hash.hexdigest()
