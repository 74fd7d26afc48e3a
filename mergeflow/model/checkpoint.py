"""Lazy access to a (sharded) checkpoint: headers first, one tensor at a time.

A checkpoint is safetensors (``model.safetensors`` or shards plus its index) or, for older
models, PyTorch zip pickles (``pytorch_model.bin`` or shards plus ``pytorch_model.bin.index.json``);
safetensors wins when a folder holds both, as in transformers. Either way every tensor is a
:class:`TensorInfo` with a file and the absolute byte offset of its data, so every reader below
works on both formats alike (see :mod:`mergeflow.model.torch_bin` for how a ``.bin`` is read as byte
ranges, through the weights-only unpickler and without reading tensor data).

Only headers are read when a :class:`Checkpoint` is opened. Tensor data is read on demand with
positional reads of the tensor's bytes (or :meth:`Checkpoint.read`, which for safetensors opens
the shard, copies out the one tensor and closes the file again), so the memory a read costs is
the tensor itself and no mapped shard stays resident.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mergeflow.errors import CheckpointError
from mergeflow.model.index import INDEX_FILE, read_weight_map
from mergeflow.model.torch_bin import read_table as read_torch_zip
from mergeflow.storage.hashing import observe_read

SINGLE_FILE = "model.safetensors"
BIN_SINGLE_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
#: Index files a checkpoint folder may hold (inputs of a merge when present).
INDEX_FILES = (INDEX_FILE, BIN_INDEX_FILE)

# safetensors header dtype strings -> torch dtypes (the ones a model checkpoint can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# Every dtype the safetensors format defines; those missing from DTYPES are valid files that
# Mergeflow cannot merge (complex numbers, unsigned 16-64 bit, sub-byte floats).
FORMAT_DTYPES = frozenset({*DTYPES, "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ",
                           "F8_E5M2FNUZ", "U16", "U32", "U64", "C64"})
MAX_HEADER = 100 * 10**6  # the safetensors library's own limit on the header's JSON
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: where it lives, its shape and dtype."""

    name: str
    file: str  # file name relative to the checkpoint folder
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16"
    offset: int = -1  # absolute byte offset of the data in ``file``; -1: not in a checkpoint file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype].is_floating_point


def _inside(folder: Path, name: str, index_path: Path) -> Path:
    """Resolve an index entry, refusing paths that escape the checkpoint folder."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise CheckpointError(
            f"{index_path}: weight_map names '{name}', a path outside the checkpoint folder; "
            "an index may only name shard files inside its own folder"
        )
    return folder / candidate


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Read and validate the tensor table of one safetensors file without reading tensor data.

    The header is parsed here (see :func:`parse_header`: every check the format implies, plus
    duplicate names, which the safetensors library lets through) and then opened once with
    ``safe_open``, so a file that passes will also read.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is corrupt, or a tensor
            has a dtype Mergeflow cannot merge.
    """
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        with open(path, "rb") as f:
            infos = parse_header(f, path.stat().st_size, path)
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except SafetensorError as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); re-download or re-save it"
        ) from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc}); check the path and its "
                              "permissions") from exc
    return infos


def read_torch_table(path: Path) -> dict[str, TensorInfo]:
    """The tensor table of one PyTorch zip ``.bin`` without reading tensor data: each tensor a
    byte range of the file, as a safetensors header gives (see :mod:`mergeflow.model.torch_bin`).

    Raises:
        CheckpointError: as :func:`mergeflow.model.torch_bin.read_table` (legacy pickle, forbidden
            globals, corrupt, non-contiguous tensor), or a tensor with a dtype Mergeflow cannot
            merge.
    """
    infos: dict[str, TensorInfo] = {}
    for key, stored in read_torch_zip(path).items():
        if stored.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor '{key}' has dtype {stored.dtype}, which "
                                  f"Mergeflow cannot merge; convert the checkpoint to one of "
                                  f"{', '.join(sorted(DTYPES))}")
        infos[key] = TensorInfo(key, path.name, stored.shape, DTYPE_NAMES[stored.dtype],
                                stored.offset)
    return infos


def parse_header(f, file_size: int, path: Path | str) -> dict[str, TensorInfo]:
    """Parse a safetensors header from an open binary file of ``file_size`` bytes.

    Checks the length prefix against the file, the JSON (an object, no repeated names), each
    entry's dtype, shape and data offsets, and that the offsets tile the data area exactly, as
    the format requires.

    Raises:
        CheckpointError: naming ``path`` and, where there is one, the tensor at fault.
    """
    what = "re-download or re-save it"
    if file_size < 8:
        raise CheckpointError(f"{path}: {file_size} bytes, too short for a safetensors file; {what}")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > MAX_HEADER or 8 + length > file_size:
        raise CheckpointError(
            f"{path}: header length {length} bytes is impossible (the file has {file_size} bytes, "
            f"the format allows {MAX_HEADER}); the file is truncated or not safetensors; {what}")
    table = _header_json(f.read(length), path)
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in table.items():
        if key == METADATA_KEY:
            _check_metadata(entry, path)
            continue
        info, span = _tensor_entry(key, entry, Path(path).name, path)
        infos[key] = replace(info, offset=8 + length + span[0])
        spans.append((*span, key))
    _check_spans(spans, file_size - 8 - length, path)
    return infos


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``json`` object hook: a name may appear once (safetensors keeps the last silently)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    """A JSON object names the same key twice."""


def _header_json(raw: bytes, path: Path | str) -> dict:
    """The header's JSON object, refusing anything else and repeated names."""
    try:
        table = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise CheckpointError(
            f"{path}: the header lists tensor '{exc.args[0]}' twice; the file is corrupt, "
            "re-download or re-save it") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the header is not valid JSON ({type(exc).__name__}); "
                              "the file is corrupt, re-download or re-save it") from exc
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object; the file is corrupt, "
                              "re-download or re-save it")
    return table


def _check_metadata(entry: object, path: Path | str) -> None:
    if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
        raise CheckpointError(f"{path}: '{METADATA_KEY}' must map names to strings; the file is "
                              "corrupt, re-download or re-save it")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_entry(key: str, entry: object, file: str,
                  path: Path | str) -> tuple[TensorInfo, tuple[int, int]]:
    """One header entry as a TensorInfo and its data span, or a CheckpointError naming it."""
    where = f"{path}: tensor '{key}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry is not an object; the file is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in FORMAT_DTYPES:
        raise CheckpointError(f"{where}: dtype {dtype!r} is not a safetensors dtype; the file is "
                              "corrupt, re-download or re-save it")
    if dtype not in DTYPES:
        raise CheckpointError(f"{where}: has dtype {dtype}, which Mergeflow cannot merge; convert "
                              f"the checkpoint to one of {', '.join(sorted(DTYPES))}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes; the file is corrupt")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
            or offsets[0] > offsets[1]):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} are invalid; the file is corrupt")
    info = TensorInfo(key, file, tuple(shape), dtype)
    if offsets[1] - offsets[0] != info.nbytes:
        raise CheckpointError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} "
                              f"bytes, but {dtype}{shape} needs {info.nbytes}; the file is corrupt")
    return info, (offsets[0], offsets[1])


def _check_spans(spans: list[tuple[int, int, str]], data_size: int, path: Path | str) -> None:
    """The tensors' data must tile the data area: no gaps, no overlaps, nothing missing."""
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            raise CheckpointError(f"{path}: tensor '{key}' starts at byte {start} of the data, "
                                  f"expected {end} (overlap or gap); the file is corrupt")
        end = stop
    if end > data_size:
        raise CheckpointError(f"{path}: the header describes {end} bytes of tensor data but the "
                              f"file holds {data_size}; it is truncated, re-download or re-save it")
    if end < data_size:
        raise CheckpointError(f"{path}: {data_size - end} bytes after the last tensor's data; the "
                              "file is corrupt, re-download or re-save it")


def row_runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted row indices as ``[start, stop)`` runs of consecutive rows (one read each)."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and r == runs[-1][1]:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [(a, b) for a, b in runs]


class Checkpoint:
    """A checkpoint folder, opened lazily.

    Args:
        folder: a folder holding ``model.safetensors``, or shards plus
            ``model.safetensors.index.json``; else ``pytorch_model.bin``, or shards plus
            ``pytorch_model.bin.index.json`` (safetensors first, as transformers looks).
        weights_file: read just this one file of the folder instead.

    Raises:
        CheckpointError: no weights, a broken index, a missing or corrupt shard, or a tensor
            that the index places in a file that does not hold it.
    """

    def __init__(self, folder: Path | str, weights_file: str | None = None) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, TensorInfo] = {}
        self._real: dict[str, str] = {}  # weight file -> its resolved path
        self._torch_files: set[str] = set()  # files read as PyTorch zips (the rest: safetensors)
        if weights_file is not None:
            self._load_single(self.folder / weights_file)
        elif (self.folder / INDEX_FILE).is_file():
            self._load_index(self.folder / INDEX_FILE)
        elif (self.folder / SINGLE_FILE).is_file():
            self._load_single(self.folder / SINGLE_FILE)
        elif (self.folder / BIN_SINGLE_FILE).is_file():
            self._load_single(self.folder / BIN_SINGLE_FILE)
        elif (self.folder / BIN_INDEX_FILE).is_file():
            self._load_index(self.folder / BIN_INDEX_FILE)
        else:
            raise CheckpointError(
                f"{self.folder}: no {SINGLE_FILE}, {INDEX_FILE}, {BIN_SINGLE_FILE} or "
                f"{BIN_INDEX_FILE}; point at a folder holding a checkpoint saved with "
                "save_pretrained"
            )

    @property
    def files(self) -> list[str]:
        """The weight files of the checkpoint, in a stable order."""
        return sorted({info.file for info in self.tensors.values()})

    def _load_single(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            self.tensors = read_header(path)
        else:
            self.tensors = read_torch_table(path)
            self._torch_files.add(path.name)

    def _load_index(self, index_path: Path) -> None:
        torch_zip = index_path.name == BIN_INDEX_FILE
        weight_map = read_weight_map(index_path)
        headers: dict[str, dict[str, TensorInfo]] = {}
        for name in sorted(set(weight_map.values())):
            path = _inside(self.folder, name, index_path)
            # The file as the index names it, relative to the folder (it may be in a subfolder).
            rel = path.relative_to(self.folder).as_posix()
            table = read_torch_table(path) if torch_zip else read_header(path)
            headers[name] = {k: replace(v, file=rel) for k, v in table.items()}
            if torch_zip:
                self._torch_files.add(rel)
        for key, name in weight_map.items():
            if key not in headers[name]:
                raise CheckpointError(
                    f"{index_path}: maps '{key}' to {name}, which does not hold it; "
                    "the index and the shards come from different saves"
                )
            self.tensors[key] = headers[name][key]
        for name, header in headers.items():
            for key in header:
                if weight_map.get(key) not in (None, name):
                    raise CheckpointError(
                        f"{self.folder / name}: tensor '{key}' also appears in "
                        f"{weight_map[key]}; a checkpoint must hold each tensor once"
                    )

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    # -- positional reads: rows and byte ranges, never a mapping of the file -----------------
    #
    # ``safe_open`` maps the whole file; every page a read touches then counts in the process's
    # RSS until the mapping closes, so reading a 2 GB tensor in blocks through one open mapping
    # still peaks at 2 GB. ``os.pread`` into a buffer of the caller's costs exactly that buffer.

    def pread(self, info: TensorInfo, start: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes of tensor ``info`` from byte ``start`` of its data.

        Raises:
            CheckpointError: the file ends early or cannot be read.
        """
        path = self.folder / info.file
        want, done = len(buffer), 0
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read tensor '{info.name}' ({exc})") from exc
        try:
            while done < want:
                got = os.preadv(fd, [buffer[done:]], info.offset + start + done)
                if got == 0:
                    raise CheckpointError(f"{path}: ends inside tensor '{info.name}'; the file "
                                          "was truncated after planning, re-download or re-save it")
                done += got
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read tensor '{info.name}' ({exc})") from exc
        finally:
            os.close(fd)
        observe_read(self._real_path(info.file), info.offset + start, buffer)

    def _real_path(self, file: str) -> str:
        """A weight file's resolved path (remembered), as the read hashes know it."""
        real = self._real.get(file)
        if real is None:
            real = self._real[file] = os.path.realpath(self.folder / file)
        return real

    def read_rows(self, name: str, start: int, stop: int,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` (along dim 0) of a tensor, in its stored dtype, on the CPU.

        ``scratch`` (uint8, at least the rows' bytes) is used as the buffer when given, so a
        loop over blocks allocates nothing; the result is then a view of it.
        """
        info = self.tensors[name]
        shape = info.shape or (1,)
        row = info.nbytes // shape[0] if shape[0] else 0
        nbytes = (stop - start) * row
        if scratch is None or scratch.numel() < nbytes:
            scratch = torch.empty(nbytes, dtype=torch.uint8)
        raw = scratch[:nbytes]
        if nbytes:
            self.pread(info, start * row, memoryview(raw.numpy()))
        tensor = raw.view(DTYPES[info.dtype])
        return tensor.reshape(stop - start, *shape[1:]) if info.shape else tensor.reshape(())

    def will_read_rows(self, name: str, rows: Sequence[int]) -> None:
        """Tell the kernel that these rows (along dim 0, sorted) of a tensor will be read soon
        (``POSIX_FADV_WILLNEED``), so it fetches them from the disk in the background while
        earlier ones are worked on. A hint: nothing happens where it is not supported."""
        info = self.tensors[name]
        if not info.shape or not info.shape[0] or not hasattr(os, "posix_fadvise"):
            return
        row = info.nbytes // info.shape[0]
        try:
            fd = os.open(self.folder / info.file, os.O_RDONLY)
        except OSError:
            return  # the read that follows reports it
        try:
            for start, stop in row_runs(rows):
                os.posix_fadvise(fd, info.offset + start * row, (stop - start) * row,
                                 os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def read_row_set(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """The given rows (along dim 0) of a tensor, stacked, in its stored dtype; each run of
        consecutive rows is one positional read."""
        parts = [self.read_rows(name, a, b) for a, b in row_runs(rows)]  # fresh buffers each
        info = self.tensors[name]
        if not parts:
            return torch.empty((0, *info.shape[1:]), dtype=DTYPES[info.dtype])
        return torch.cat(parts)

    def _read_whole(self, info: TensorInfo) -> torch.Tensor:
        """A whole tensor by one positional read of its bytes (a fresh buffer, CPU)."""
        return self.read_rows(info.name, 0, info.shape[0] if info.shape else 1)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (CPU).

        Raises:
            CheckpointError: the tensor's bytes cannot be read (e.g. the shard was truncated).
        """
        return self._read_whole(self.tensors[name])  # no header parsed again, unlike safe_open

    def read_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read several tensors (CPU), e.g. a weight and its siblings; one positional read each.

        Raises:
            CheckpointError: a tensor's bytes cannot be read.
        """
        return {name: self._read_whole(self.tensors[name]) for name in names}

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time (CPU), shard by shard; memory peaks at one
        tensor. Default: every tensor.

        Raises:
            CheckpointError: a tensor's bytes cannot be read.
        """
        by_file: dict[str, list[str]] = {}
        for name in self.tensors if names is None else names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        for keys in by_file.values():
            for key in keys:
                yield key, self._read_whole(self.tensors[key])
