"""A sharded checkpoint's index (``model.safetensors.index.json``): which file holds each
tensor. Imports nothing heavy, so the command line can list a base's shards before it imports
torch (:func:`mergeflow.storage.hashing.hash_ahead`)."""

from __future__ import annotations

import json
from pathlib import Path

from mergeflow.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``):
    tensor name -> shard file name.

    Raises:
        CheckpointError: unreadable JSON, no ``weight_map`` object, or an entry that does not
            map a name to a file name.
    """
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(
            f"{index_path}: unreadable index ({type(exc).__name__}: {exc}); it must be JSON with "
            "a 'weight_map'") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: 'weight_map' must be a non-empty object mapping "
                              "tensor names to shard files; re-save the checkpoint")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index_path}: weight_map maps '{key}' to {name!r}, not a file "
                                  "name; re-save the checkpoint")
    return weight_map


def safetensors_shards(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: those its index names, else every
    ``*.safetensors`` in it, sorted.

    Raises:
        CheckpointError: the index cannot be read.
    """
    index = folder / INDEX_FILE
    if index.is_file():
        return [folder / name for name in sorted(set(read_weight_map(index).values()))]
    return sorted(folder.glob("*.safetensors"))
