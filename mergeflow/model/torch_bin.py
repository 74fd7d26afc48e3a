"""The tensor table of a PyTorch zip checkpoint (``pytorch_model.bin``), read without its data.

Design: a ``.bin`` tensor becomes a byte range of its file, exactly like a safetensors tensor.

``torch.save`` (the zip format, the default since torch 1.6) writes a zip archive whose records
are all *stored*, never compressed: ``<archive>/data.pkl`` is the pickled state dict, and every
storage is one record ``<archive>/data/<key>`` (aligned to 64 bytes). A tensor is a view of a
storage: a dtype, a shape, strides and an element offset. A tensor laid out contiguously in its
storage therefore occupies one byte range of the file, and the rest of Mergeflow (headers at
planning, row blocks read with ``os.preadv`` at execution, sampled rows at verification, raw
byte copies) reads it through :class:`mergeflow.model.checkpoint.Checkpoint` unchanged.

How the table is found, without executing anything and without reading tensor bytes:

* ``data.pkl`` is unpickled by ``torch.load(weights_only=True, map_location="meta")``: torch's
  weights-only unpickler (only tensors, containers and plain values; any other global is refused
  before it runs) with meta storages, so no storage record is read. For each meta storage torch
  records the offset of its record's data in the file (``_checkpoint_offset``).
* Those offsets are checked against the zip directory as Python's ``zipfile`` reads it: every
  ``data/<key>`` record, its compression (stored), its size and the data offset after its local
  header. A tensor whose storage matches no record, or runs past its record, is refused.
* Tensors sharing a storage (tied weights, slices of one buffer) are fine; a tensor that is not
  contiguous in its storage (e.g. saved transposed) cannot be read as rows and is refused, naming
  the key.

``torch.load(mmap=True)`` would also read lazily, but every page a read touches then counts in
the process's RSS until the mapping closes; the positional reads cost only their buffer.

Refused with a :class:`CheckpointError` that names the file and gives the conversion command:
the legacy (non-zip) pickle format, TorchScript archives, big-endian checkpoints, and pickles
that need anything the weights-only unpickler forbids.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeflow.errors import CheckpointError

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header (30 bytes)
LOCAL_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a ``.bin`` lies: a contiguous byte range of the file."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # absolute byte offset of the tensor's first element in the file


def convert_command(path: Path | str) -> str:
    """What to do with a ``.bin`` Mergeflow cannot read: re-save its model folder (and its
    tokenizer) as safetensors with transformers."""
    folder = Path(path).parent
    return (f"re-save the model as safetensors once, e.g. python -c \"from transformers import "
            f"AutoModelForCausalLM as M, AutoTokenizer as T; s, d = '{folder}', "
            f"'{folder}-safetensors'; M.from_pretrained(s).save_pretrained(d); "
            "T.from_pretrained(s).save_pretrained(d)\" (with the model's own Auto class), and "
            "merge from the new folder")


def read_table(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one PyTorch zip checkpoint and their byte ranges, reading no tensor data.

    Raises:
        CheckpointError: the file is missing or corrupt, is a legacy (non-zip) pickle, a
            TorchScript archive or big-endian, its pickle needs more than the weights-only
            unpickler allows, it holds something other than named tensors, or a tensor is not
            contiguous in its storage.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    records = _data_records(path)
    state = _unpickle(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a pickled {type(state).__name__}, not a state dict "
                              f"of named tensors; {convert_command(path)}")
    return {key: _stored(key, tensor, records, path) for key, tensor in state.items()}


def _data_records(path: Path) -> dict[int, tuple[str, int]]:
    """Every storage record of the archive: data offset -> (record name, size in bytes)."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            infos = archive.infolist()
            _check_archive(archive, infos, path)
            records: dict[int, tuple[str, int]] = {}
            for info in infos:
                parts = info.filename.split("/")
                if len(parts) == 3 and parts[1] == "data":
                    records[_data_offset(f, info, path)] = (info.filename, info.file_size)
            return records
    except zipfile.BadZipFile as exc:
        raise CheckpointError(_legacy_or_corrupt(path)) from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc}); check the path and its "
                              "permissions") from exc


def _legacy_or_corrupt(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # a pickle's PROTO opcode: torch.save's pre-1.6 (legacy) format
        return (f"{path}: a legacy (non-zip) PyTorch pickle, saved before torch 1.6 or with "
                "_use_new_zipfile_serialization=False; Mergeflow reads only zip-format .bin "
                f"files lazily. Convert it once: {convert_command(path)}")
    return (f"{path}: not a PyTorch checkpoint (no zip archive, no pickle); the file is corrupt "
            "or truncated, re-download or re-save it")


def _check_archive(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], path: Path) -> None:
    """Refuse archives this reader cannot take as byte ranges."""
    names = {info.filename.split("/", 1)[-1] for info in infos}
    if "data.pkl" not in names:
        kind = "a TorchScript archive" if "constants.pkl" in names else "a zip without data.pkl"
        raise CheckpointError(f"{path}: {kind}, not a torch.save state dict; "
                              f"{convert_command(path)}")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: record '{info.filename}' is compressed (torch.save "
                                  "never compresses); re-save it with torch.save or as safetensors")
        if info.filename.endswith("/byteorder") and archive.read(info).strip() == b"big":
            raise CheckpointError(f"{path}: saved on a big-endian machine; convert it there "
                                  f"or with {convert_command(path)}")


def _data_offset(f, info: zipfile.ZipInfo, path: Path) -> int:
    """Absolute offset of a stored record's data: after its local header, name and extra field."""
    f.seek(info.header_offset)
    raw = f.read(LOCAL_HEADER.size)
    if len(raw) != LOCAL_HEADER.size or raw[:4] != LOCAL_MAGIC:
        raise CheckpointError(f"{path}: record '{info.filename}' has no local zip header; the "
                              "file is corrupt, re-download or re-save it")
    name_len, extra_len = LOCAL_HEADER.unpack(raw)[-2:]
    start = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > os.fstat(f.fileno()).st_size:
        raise CheckpointError(f"{path}: record '{info.filename}' runs past the end of the file; "
                              "it is truncated, re-download or re-save it")
    return start


def _unpickle(path: Path) -> object:
    """``data.pkl`` through the weights-only unpickler, with meta storages (no data read)."""
    try:
        return torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: its pickle needs {_unsafe_globals(path)}, which torch.load(weights_only=True) "
            "refuses to run; Mergeflow never unpickles more than weights. If you trust the file's "
            "source, re-save it as safetensors once, e.g. python -c \"import torch; from "
            "safetensors.torch import save_file; save_file({k: v.contiguous() for k, v in "
            f"torch.load('{path}', weights_only=False).items()}}, '{path.parent}/model.safetensors')\""
        ) from exc
    except (RuntimeError, ValueError, EOFError, OSError, KeyError, TypeError,
            AssertionError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); re-download or "
                              "re-save it") from exc


def _unsafe_globals(path: Path) -> str:
    """The globals the pickle imports beyond what the weights-only unpickler allows, as text."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # only for the message; the refusal stands either way
        names = []
    return ", ".join(names) if names else "objects other than tensors"


def _stored(key: object, tensor: object, records: dict[int, tuple[str, int]],
            path: Path) -> StoredTensor:
    """One state-dict entry as a byte range of the file, or a CheckpointError naming it."""
    if not isinstance(key, str):
        raise CheckpointError(f"{path}: the state dict has a key {key!r}, not a tensor name")
    where = f"{path}: tensor '{key}'"
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        what = type(tensor).__name__ if not isinstance(tensor, torch.Tensor) else tensor.layout
        raise CheckpointError(f"{path}: entry '{key}' is {what}, not a dense tensor; "
                              f"{convert_command(path)}")
    storage = tensor.untyped_storage()
    start = getattr(storage, "_checkpoint_offset", None)
    if start not in records:
        raise CheckpointError(f"{where}: its storage matches no data record of the archive "
                              f"(offset {start}); the file is corrupt, re-download or re-save it")
    record, size = records[start]
    itemsize = tensor.element_size()
    begin, nbytes = tensor.storage_offset() * itemsize, tensor.numel() * itemsize
    if storage.nbytes() != size or begin + nbytes > size:
        raise CheckpointError(f"{where}: needs bytes {begin}..{begin + nbytes} of '{record}', "
                              f"which holds {size}; the file is corrupt, re-download or re-save it")
    if not tensor.is_contiguous():
        raise CheckpointError(f"{where}: is stored non-contiguously (strides {tensor.stride()} for "
                              f"shape {tuple(tensor.shape)}), so its rows are not byte ranges; "
                              f"{convert_command(path)}")
    return StoredTensor(tuple(tensor.shape), tensor.dtype, start + begin)
