"""The base's ``config.json``: the one place it is read and parsed.

Every other module asks :func:`base_config` (the whole file, refusing a missing or unreadable
one) or :func:`read_base_config` (None when there is none); the parse is kept per file
version, so a merge reads it once however many steps ask.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path

from mergeflow.errors import InputError

CONFIG = "config.json"


@functools.lru_cache(maxsize=16)
def _parsed(path: str, mtime_ns: int, size: int) -> dict | InputError:
    """The parsed file (keyed by its version: path, mtime, size), or the error it gives."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        return InputError(f"{path}: unreadable JSON ({exc})")
    if not isinstance(config, dict):
        return InputError(f"{path}: expected a JSON object")
    problem = _shape_problem(config)
    if problem is not None:
        return InputError(f"{path}: {problem}; use the base model's own config.json")
    return config


# sizes every decoder config gives as positive integers (where the key is there at all)
_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _shape_problem(config: dict) -> str | None:
    """What makes this config.json describe no model: ``architectures`` not a list of names,
    a size that is not a positive integer."""
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        return f"'architectures' must be a list of class names, not {archs!r}"
    for part in (config, config.get("text_config")):
        if not isinstance(part, dict):
            continue
        for key in _SIZES:
            value = part.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                return f"'{key}' must be a positive integer, not {value!r}"
    return None


def base_config(folder: str | Path) -> dict:
    """The base's config.json, which every merged model needs (a fresh copy: callers may
    change it).

    Raises:
        InputError: the file is missing, unreadable, or not a JSON object (naming it).
    """
    path = Path(folder) / CONFIG
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None or not path.is_file():
        raise InputError(f"{path}: not found; the base folder needs the model's config.json")
    parsed = _parsed(str(path), stat.st_mtime_ns, stat.st_size)
    if isinstance(parsed, InputError):
        raise InputError(str(parsed))
    return copy.deepcopy(parsed)


def read_base_config(folder: str | Path | None) -> dict | None:
    """The base's config.json, or None when there is no folder or no readable config."""
    if folder is None:
        return None
    try:
        return base_config(folder)
    except InputError:
        return None


def config_digest(folder: str | Path) -> str | None:
    """The sha256 of the base's ``config.json`` as canonical JSON (sorted keys, no spaces): what
    the caches of answers learnt from the model's code are keyed by; None when there is no
    readable config or it is not plain JSON."""
    config = read_base_config(folder)
    if config is None:
        return None
    try:
        canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(canonical.encode()).hexdigest()


def text_config(config: dict) -> dict:
    """The part of config.json that describes the language model (nested in multimodal ones)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config
