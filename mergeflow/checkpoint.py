"""Lazy access to a (sharded) safetensors checkpoint: headers first, one tensor at a time.

Only headers are read when a :class:`Checkpoint` is opened. Tensor data is read on demand with
:meth:`Checkpoint.read`, which opens the shard, copies out the one tensor and closes the file
again, so the memory a read costs is the tensor itself and no mapped shard stays resident.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mergeflow.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

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


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor: where it lives, its shape and dtype."""

    name: str
    file: str  # file name relative to the checkpoint folder
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16"

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
    """Read the tensor table of one safetensors file without reading tensor data.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is corrupt.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            infos = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(key)
                dtype = sl.get_dtype()
                if dtype not in DTYPES:
                    raise CheckpointError(
                        f"{path}: tensor '{key}' has dtype {dtype}, which Mergeflow cannot merge"
                    )
                infos[key] = TensorInfo(key, path.name, tuple(sl.get_shape()), dtype)
            return infos
    except SafetensorError as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); re-download or re-save it"
        ) from exc


class Checkpoint:
    """A safetensors checkpoint folder, opened lazily.

    Args:
        folder: a folder holding ``model.safetensors``, or shards plus
            ``model.safetensors.index.json``.

    Raises:
        CheckpointError: no weights, a broken index, a missing or corrupt shard, or a tensor
            that the index places in a file that does not hold it.
    """

    def __init__(self, folder: Path | str, weights_file: str | None = None) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, TensorInfo] = {}
        if weights_file is not None:
            self._load_single(self.folder / weights_file)
        elif (self.folder / INDEX_FILE).is_file():
            self._load_index(self.folder / INDEX_FILE)
        elif (self.folder / SINGLE_FILE).is_file():
            self._load_single(self.folder / SINGLE_FILE)
        else:
            raise CheckpointError(
                f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}; point at a folder holding "
                "a safetensors checkpoint (save it with save_pretrained(safe_serialization=True))"
            )

    @property
    def files(self) -> list[str]:
        """The weight files of the checkpoint, in a stable order."""
        return sorted({info.file for info in self.tensors.values()})

    def _load_single(self, path: Path) -> None:
        self.tensors = read_header(path)

    def _load_index(self, index_path: Path) -> None:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{index_path}: unreadable index ({exc}); it must be JSON with a 'weight_map'"
            ) from exc
        headers: dict[str, dict[str, TensorInfo]] = {}
        for name in sorted(set(weight_map.values())):
            headers[name] = read_header(_inside(self.folder, name, index_path))
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

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into memory (CPU).

        Raises:
            CheckpointError: the tensor's bytes cannot be read (e.g. the shard was truncated).
        """
        info = self.tensors[name]
        path = self.folder / info.file
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({exc})") from exc

    def read_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read several tensors (CPU), opening each shard once; e.g. a weight and its siblings.

        Raises:
            CheckpointError: a tensor's bytes cannot be read.
        """
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, keys in by_file.items():
            path = self.folder / file
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in keys:
                        out[key] = f.get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read tensors {keys} ({exc})") from exc
        return {name: out[name] for name in names}
