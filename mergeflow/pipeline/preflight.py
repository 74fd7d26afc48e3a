"""Checks run once after planning and before any work: the adapter's values and the disk.

* Every adapter tensor is read once (adapters are small): NaN or Inf is refused naming the key,
  and an adapter whose LoRA deltas are all zero is a "warning:" the caller adds to the plan's
  notes (and so to the merge report, the model card and the manifest).
* The output's bytes (the planned shards, plus the tokenizer and small files) are compared with
  the free space where the output is staged; too little is a :class:`NotEnoughDiskSpace` with the
  numbers, before a byte is written. ``MERGEFLOW_MIN_FREE_BYTES`` (e.g. ``2GB``) asks for that
  much headroom to be left free on top.
* A resumed run starts without the manifest an interrupted run may have left in staging.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mergeflow.engine.gguf_quant import SIXTEEN_BIT, converted_type, made_from, split_types
from mergeflow.errors import InputError, NotEnoughDiskSpace
from mergeflow.model.adapter import Adapter, check_values
from mergeflow.output.folder import MANIFEST, TOKENIZER_FILES, read_manifest
from mergeflow.plan import MergePlan, parse_size
from mergeflow.spec import SAFETENSORS_AND_GGUF, format_size
from mergeflow.storage.staging import Staging

MIN_FREE_ENV = "MERGEFLOW_MIN_FREE_BYTES"
SMALL_FILES = 2 * 2**20  # config, generation config, index, model card, manifest: generous


def check(plan: MergePlan, adapter: Adapter, out: Path | str, *,
          low_disk: bool = False, written: int = 0) -> list[str]:
    """Run every preflight check and return its warnings (``warning: ...`` notes, e.g. an
    adapter whose deltas are all zero); the plan is not changed. ``low_disk``: shards are
    shipped and deleted one at a time, so only the largest must fit. ``written``: bytes of
    its shards already on that disk, about to be moved into staging (merged ahead).

    Raises:
        AdapterError: an adapter tensor holds NaN or Inf.
        NotEnoughDiskSpace: the output's disk has too little free space.
    """
    warnings = check_values(adapter)
    check_disk_space(plan, Path(out), low_disk=low_disk, written=written)
    return warnings


def check_disk_space(plan: MergePlan, out: Path, *, low_disk: bool = False,
                     written: int = 0) -> None:
    """Refuse to start a merge whose output cannot fit beside ``out`` (``written``: bytes of
    it already on that disk, out of staging: merged ahead).

    Raises:
        NotEnoughDiskSpace: with the bytes needed and free, and the folder.
    """
    if _already_there(plan, out):
        return
    folder = _existing_folder(out.parent)
    needed = max(0, required_bytes(plan, out, low_disk=low_disk) - written)
    headroom = min_free_bytes()
    free = shutil.disk_usage(folder).free
    if free < needed + headroom:
        extra = f" + {_size(headroom)} kept free ({MIN_FREE_ENV})" if headroom else ""
        raise NotEnoughDiskSpace(
            f"{folder}: {_size(free)} free, but the merge into {out} needs {_size(needed)}{extra}; "
            f"free {_size(needed + headroom - free)} or set `out` on a bigger disk")


def required_bytes(plan: MergePlan, out: Path, *, low_disk: bool = False) -> int:
    """Bytes the merge still needs on disk: the shards not already finished by an interrupted
    run of the same plan (``low_disk``: the largest shard), the GGUF files (:func:`gguf_bytes`),
    the tokenizer and the small files."""
    gguf_alone = plan.options.get("save_method") == "gguf"  # the streamed 16-bit file: total_size
    if low_disk and not gguf_alone:
        total = max((s.nbytes for s in plan.shards), default=0)
    else:
        total = plan.total_size - _resumable_bytes(plan, Staging.for_output(out))
    total += gguf_bytes(plan, low_disk=low_disk)
    tokenizer = plan.options.get("tokenizer")
    if tokenizer:
        total += sum(_file_size(Path(str(tokenizer)) / name) for name in TOKENIZER_FILES)
    return total + SMALL_FILES


def gguf_bytes(plan: MergePlan, *, low_disk: bool = False) -> int:
    """GGUF bytes beyond ``plan.total_size``. ``save_method=gguf``: the 16-bit file streamed
    from the merge is what ``plan.total_size`` counts; the types llama.cpp's quantizer makes
    from it are on disk beside it for a moment: each quantized file's bound at q8_0's 8.5 bits a
    weight (every offered type takes fewer) against the plan's 16, a second 16-bit type at the
    full size; with ``low_disk`` one of them at a time (each is shipped and deleted before the
    next). ``merged_16bit,gguf``: the converted file beside the shards, plus those. 0 for any
    other output."""
    if plan.options.get("save_method") not in ("gguf", SAFETENSORS_AND_GGUF):
        return 0
    types = split_types(str(plan.options.get("gguf_type") or ""))
    source = made_from(types, plan.dtype)
    made = [plan.total_size if t in SIXTEEN_BIT else plan.total_size * 17 // 32
            for t in types if source is not None and t != source]
    quantized = max(made, default=0) if low_disk else sum(made)
    if plan.options.get("save_method") == "gguf":
        return quantized
    converted = converted_type(types, plan.dtype)
    return quantized + (plan.total_size if converted in SIXTEEN_BIT else plan.total_size * 17 // 32)


def min_free_bytes() -> int:
    """``MERGEFLOW_MIN_FREE_BYTES`` as bytes (0 when unset).

    Raises:
        InputError: the value is not a size.
    """
    text = os.environ.get(MIN_FREE_ENV, "").strip()
    if not text or text == "0":
        return 0
    try:
        return parse_size(text)
    except InputError:
        raise InputError(f"{MIN_FREE_ENV}={text!r}: not a size; use bytes or e.g. 500MB, "
                         "2GiB") from None


def _already_there(plan: MergePlan, out: Path) -> bool:
    """True when ``out`` already holds this very merge (nothing will be written)."""
    manifest = read_manifest(out) if (out / MANIFEST).is_file() else None
    return bool(manifest) and manifest.get("plan_fingerprint") == plan.fingerprint()


def _resumable_bytes(plan: MergePlan, staging: Staging) -> int:
    """Bytes of planned shards already in a staging folder of the same plan (kept on resume)."""
    try:
        if MergePlan.load(staging.plan_path).fingerprint() != plan.fingerprint():
            return 0
    except (OSError, ValueError):
        return 0
    return sum(_file_size(staging.folder / s.filename) for s in plan.shards)


def _existing_folder(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where the staging folder will be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _size(n: int) -> str:
    """Bytes, and a readable figure beside them (:func:`mergeflow.spec.format_size`)."""
    return f"{n} bytes ({format_size(n, digits=1)})" if n >= 1000 else f"{n} bytes"
