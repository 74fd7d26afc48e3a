"""Merge a live, trained ``peft.PeftModel``: Unsloth's ``save_pretrained_merged`` call, streaming.

A training script ends with ``save_pretrained_merged(model, "out", tokenizer)`` (or, after
:func:`patch`, ``model.save_pretrained_merged(...)`` exactly as with Unsloth). The output folder
is the CLI's - sharded SafeTensors, config, tokenizer, model card, manifest with checksums,
verified, resumable - because the merge *is* the CLI's streaming merge (:func:`mergeflow.merge`).
What this module adds is getting its two inputs out of the live model without a second copy:

* **The adapter** always comes from the live model (PEFT's own ``save_pretrained`` of the active
  adapter, a few MB), written to a temporary folder, so the merge uses exactly the trained weights.
* **The base**, when its checkpoint is on disk (the model's ``name_or_path``, the adapter's
  ``base_model_name_or_path``, or the local Hugging Face cache; nothing is downloaded unless
  ``allow_download=True``), is read from those files, after a cheap check that it really is the
  base the live model holds: every tensor name and shape, and the first, middle and last rows of
  every tensor compared with the live values. The comparison goes through the checkpoint's
  in-memory -> disk map (:mod:`mergeflow.model.modelmap`), so a Mixtral or Qwen3-MoE checkpoint's
  per-expert tensors are compared with the live stacked experts, and a VLM's disk names with
  the renamed live ones: such a base is read from disk, not spilled. A base found
  automatically that fails the check is not used (the note says why); one passed as ``base=``
  is refused.
* **A base only in memory** (built or changed in memory, or quantized at load time and merged onto
  its dequantized weights) is *spilled*: the live base's state dict, tensor by tensor and in its
  stored form (a bitsandbytes weight's packed bytes and quant-state siblings; PEFT's
  ``base_layer.`` stripped, ``lora_`` tensors dropped), is written in row blocks to a temporary
  SafeTensors checkpoint with its config.json (``quantization_config`` included), and the normal
  streaming merge reads it. Host memory stays at about one block (a GPU-resident tensor comes to
  the host a block at a time); the cost is one extra write of the base's *stored* size (a 4-bit
  70B base: ~35 GB) on ``temporary_location``, removed when the merge is published. Merging
  straight from the live modules (dequantize on the device, merge, write) would save that write;
  the spill was chosen because it reuses the one tested, verified, resumable core unchanged.

The temporary files are content-addressed (as in the Hugging Face cache: ``blobs/<sha256>`` with
symlinks), so the merge plan identifies them by content: rerunning the same call after a
failure resumes the merge from its finished shards, and after a success finds it up to date.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mergeflow.engine.writer import ShardWriter
from mergeflow.errors import CheckpointError, InputError, MergeError, OptionsError
from mergeflow.model.checkpoint import DTYPE_NAMES, Checkpoint
from mergeflow.model.modelmap import Axis, Piece
from mergeflow.output.folder import find_tokenizer
from mergeflow.pipeline.local import merge
from mergeflow.pipeline.results import MergeReport
from mergeflow.storage.confine import LIVE_WORK_PREFIX
from mergeflow.storage.hashing import sha256_file

log = logging.getLogger("mergeflow.live.save")

#: Unsloth's save_method names -> Mergeflow's. ``merged_4bit_forced`` is Unsloth's way of
#: insisting on a 4-bit save past its warning; Mergeflow's merged_4bit re-quantizes only the
#: changed weights with the base's own bitsandbytes settings, so there is nothing to force.
SAVE_METHODS = {"merged_16bit": "merged_16bit", "merged_4bit": "merged_4bit",
                "merged_4bit_forced": "merged_4bit", "lora": "lora", "fp8": "fp8"}
SPILL_FILE = "model.safetensors"
SPILL_BLOCK = 24 * 2**20  # bytes of one spilled row block
MEMORY = "memory"  # base="memory": always merge from the live weights


# --------------------------------------------------------------------------- the public calls


def save_pretrained_merged(
    model: Any,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    push_to_hub: bool = False,
    token: str | bool | None = None,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    save_function: Any = None,
    max_shard_size: int | str = "5GB",
    safe_serialization: bool = True,
    variant: str | None = None,
    save_peft_format: bool = True,
    tags: list[str] | None = None,
    temporary_location: str | os.PathLike | None = None,
    maximum_memory_usage: float = 0.75,
    *,
    private: bool | None = None,
    base: str | os.PathLike | None = None,
    allow_download: bool = False,
    merge_onto: str = "dequantized",
    original_base: str | os.PathLike | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    push_to: str | None = None,
    **options: Any,
) -> MergeReport | None:
    """Merge a live LoRA ``PeftModel`` and write the merged checkpoint to ``save_directory``.

    The folder is the one ``mergeflow merge`` writes (shards, index, config, tokenizer, model
    card, manifest last), verified before it appears. The live model is left as it is (still a
    PeftModel, still trainable): nothing is merged into it and no second copy is made.

    Args:
        model: a ``peft.PeftModel`` with one active LoRA adapter, on CPU or GPU, over a
            full-precision or bitsandbytes 4-bit/8-bit base.
        save_directory: the output folder (with ``push_to_hub=True``: the Hub repo id, as
            Unsloth reads it; the merged folder is then kept as in :func:`push_to_hub_merged`).
        tokenizer: saved with the model (default: the tokenizer files of the base on disk; none
            when the base is only in memory).
        save_method: ``"merged_16bit"`` (a plain 16-bit checkpoint: ``dtype="auto"`` means the
            base's float16 or bfloat16, bfloat16 for a float32 base, a quantized base's 16-bit
            compute dtype), ``"merged_4bit"`` (4-bit/8-bit base only: the changed weights
            re-quantized with the base's own settings), ``"merged_4bit_forced"`` (the same;
            Unsloth's name for forcing past its warning) or ``"lora"`` (the adapter alone).
        push_to_hub, token, private: publish to the Hub afterwards (see :func:`push_to_hub_merged`).
        is_main_process: False does nothing and returns None (distributed training: only the
            main process saves).
        state_dict, save_function, safe_serialization, variant: accepted for Unsloth's signature
            and unneeded: the weights always come from the live model (a ``state_dict`` is
            refused, since merging other weights than the live ones is what this call avoids),
            and the output is always SafeTensors with the standard file names
            (``safe_serialization=False`` or a ``variant`` is refused).
        save_peft_format: accepted and unneeded: ``lora`` always writes PEFT's own format.
        max_shard_size: largest output shard, e.g. ``"5GB"`` or an int in bytes.
        tags: accepted and unneeded: the model card (part of the checksummed output) carries
            Mergeflow's tags (mergeflow, lora, merge); add others on the Hub afterwards.
        temporary_location: where the adapter (and a spilled in-memory base) are written;
            default: beside ``save_directory``. Removed once the output is published.
        maximum_memory_usage: fraction of the memory available now that the merge's working
            buffers may use (Mergeflow's ``memory_limit``); the merge streams row blocks, so
            this bounds block size and parallelism, never whether the model fits.
        base: the base checkpoint folder (or ``hf://org/name``): checked against the live model
            and refused when it is not its base. ``"memory"``: always merge from the live
            weights. Default: look on disk as described in the module docstring.
        allow_download: let the base be fetched from the Hub when it is not on disk or in the
            local cache (default: never download; the live weights are used instead).
        merge_onto: for a quantized live base: ``"dequantized"`` (the weights the adapter was
            trained against, default) or ``"original"`` (the 16-bit checkpoint it was quantized
            from: ``original_base``, or found on disk when the model was quantized at load).
        original_base: the 16-bit checkpoint for ``merge_onto="original"``.
        dtype: ``"auto"``, ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        overwrite: replace a finished output made from other inputs.
        push_to: publish the output to ``hf://org/name`` or ``s3://bucket/prefix`` (the CLI's
            ``--push-to``; credentials from the environment).
        **options: any other :class:`~mergeflow.spec.MergeSpec` field (``device``, ``workers``,
            ``block_size``, ``verify``, ``pad_vocab_to_multiple_of``, ...).

    Returns:
        The :class:`~mergeflow.pipeline.results.MergeReport`; its ``notes`` say which base was used and why,
        which weights were merged onto, and the output dtype chosen. None when
        ``is_main_process`` is False.

    Raises:
        InputError: not a LoRA PeftModel, an option that cannot mean anything here, or a
            ``base`` that is not the live model's base.
        MergeError: as :func:`mergeflow.merge` (the temporary folder is kept; rerun to resume).
    """
    if not is_main_process:
        return None
    _refuse_unneeded(state_dict, safe_serialization, variant)
    if push_to_hub:
        return push_to_hub_merged(
            model, str(save_directory), tokenizer, save_method, token=token, private=private,
            max_shard_size=max_shard_size, tags=tags, temporary_location=temporary_location,
            maximum_memory_usage=maximum_memory_usage, base=base, allow_download=allow_download,
            merge_onto=merge_onto, original_base=original_base, dtype=dtype,
            overwrite=overwrite, **options)
    method = _save_method(save_method)
    peft = _check_peft_model(model)
    out = Path(save_directory)
    work = _work_folder(out, temporary_location)
    notes: list[str] = []
    adapter_dir = save_live_adapter(peft, work / "adapter", tokenizer)
    merge_options = dict(options, max_shard_size=max_shard_size, overwrite=overwrite,
                         dtype=_output_dtype(peft, method, dtype, notes), save_method=method,
                         push_to=push_to)
    merge_options.setdefault("device", _model_device(peft))
    merge_options.setdefault("memory_limit", _memory_limit(maximum_memory_usage))
    base_dir, extra = _choose_base(peft, work, method, base, allow_download, merge_onto,
                                   original_base, notes)
    merge_options.update(extra)
    if tokenizer is None and find_tokenizer([adapter_dir, base_dir]) is None:
        merge_options.setdefault("no_tokenizer", True)
        notes.append("no tokenizer: none was passed and the base holds none; pass `tokenizer=...` "
                     "to ship one")
    report = merge(base_dir, adapter_dir, out, **merge_options)
    report.notes = [*notes, *report.notes]
    for note in notes:
        log.info("%s: %s", out, note)
    shutil.rmtree(work, ignore_errors=True)
    return report


def push_to_hub_merged(
    model: Any,
    repo_id: str,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    use_temp_dir: bool | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    max_shard_size: int | str = "5GB",
    create_pr: bool = False,
    safe_serialization: bool = True,
    revision: str | None = None,
    commit_description: str | None = None,
    tags: list[str] | None = None,
    temporary_location: str | os.PathLike | None = None,
    maximum_memory_usage: float = 0.75,
    *,
    save_directory: str | os.PathLike | None = None,
    **options: Any,
) -> MergeReport:
    """Merge as :func:`save_pretrained_merged`, then publish the folder to the Hub repo
    ``repo_id`` (``org/name``) in one commit, the manifest last; files already there are skipped.

    Args:
        repo_id: ``org/name`` (``hf://org/name`` also accepted).
        use_temp_dir: True: merge into a temporary folder removed after the upload. Otherwise
            the merged folder is kept in ``save_directory`` (default ``./<name>``), so a rerun
            finds it finished and only uploads what is missing.
        commit_message, private, token, create_pr, revision: the Hub commit's options (``token``:
            default ``HF_TOKEN`` or the stored login; ``True`` means the same).
        commit_description: accepted and unneeded: Mergeflow's commit carries only a message.
        tags, safe_serialization, max_shard_size, temporary_location, maximum_memory_usage,
            **options: as :func:`save_pretrained_merged`.

    Returns:
        The merge's report; ``out`` is the ``hf://`` destination.

    Raises:
        SinkError: the Hub refused; TransientError: worth retrying (the merge is not redone).
        Anything :func:`save_pretrained_merged` raises.
    """
    from mergeflow.remote.publish import publish

    dest = repo_id if repo_id.startswith("hf://") else f"hf://{repo_id}"
    name = dest.removeprefix("hf://").split("@")[0].rstrip("/").split("/")[-1]
    if use_temp_dir and temporary_location:
        Path(temporary_location).mkdir(parents=True, exist_ok=True)
    temp = tempfile.mkdtemp(prefix="mergeflow-push-", dir=temporary_location) \
        if use_temp_dir else None
    folder = Path(temp) / name if temp else Path(save_directory or name)
    try:
        report = save_pretrained_merged(
            model, folder, tokenizer, save_method, max_shard_size=max_shard_size,
            safe_serialization=safe_serialization, tags=tags,
            temporary_location=temporary_location, maximum_memory_usage=maximum_memory_usage,
            **options)
        assert report is not None
        publish(folder, dest, token=token if isinstance(token, str) else None, private=private,
                revision=revision, create_pr=create_pr or None, commit_message=commit_message)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    report.out = dest
    return report


def patch(model: Any) -> Any:
    """Add :func:`save_pretrained_merged` and :func:`push_to_hub_merged` to ``model`` as methods
    (this instance only; no class or library is changed), so code written for Unsloth's
    ``model.save_pretrained_merged(...)`` runs as it is. Returns ``model``."""
    _check_peft_model(model)
    model.save_pretrained_merged = types.MethodType(save_pretrained_merged, model)
    model.push_to_hub_merged = types.MethodType(push_to_hub_merged, model)
    return model


# --------------------------------------------------------------------------- checks and options


def _refuse_unneeded(state_dict: dict | None, safe_serialization: bool,
                     variant: str | None) -> None:
    if state_dict is not None:
        raise OptionsError("state_dict: not supported; the merge always reads the live model's "
                           "own weights (so it can never merge onto other ones); drop it")
    if not safe_serialization:
        raise OptionsError("safe_serialization=False: Mergeflow writes SafeTensors only; drop it")
    if variant is not None:
        raise OptionsError(f"variant={variant!r}: not supported; the output uses the standard "
                           "file names (model-0000N-of-0000M.safetensors); drop it")


def _save_method(save_method: str) -> str:
    try:
        return SAVE_METHODS[save_method]
    except KeyError:
        raise OptionsError(f"save_method={save_method!r}: use one of "
                           f"{', '.join(SAVE_METHODS)}") from None


def _check_peft_model(model: Any) -> Any:
    """The model, if it is a PeftModel with exactly one active LoRA adapter."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise InputError(f"{type(model).__name__}: not a peft.PeftModel; pass the model "
                         "get_peft_model() (or PeftModel.from_pretrained) returned")
    active = model.active_adapters
    if len(active) != 1:
        raise InputError(f"the model has {len(active)} active adapters ({active}); activate one "
                         "with model.set_adapter(name)")
    config = model.peft_config[active[0]]
    if str(getattr(config, "peft_type", "")).split(".")[-1].upper() != "LORA":
        raise InputError(f"adapter {active[0]!r} is {config.peft_type}, not LoRA")
    return model


def _model_device(model: Any) -> str:
    """Where the merge math runs: on CUDA when the live model is there."""
    return "cuda" if any(p.is_cuda for p in model.parameters()) else "cpu"


def _memory_limit(fraction: float) -> str | None:
    """``maximum_memory_usage`` as the spec's ``memory_limit`` (bytes, as text)."""
    from mergeflow.pipeline.resources import available_memory

    if not 0 < fraction <= 1:
        raise OptionsError(f"maximum_memory_usage={fraction}: must be in (0, 1]")
    available = available_memory()
    return str(int(available * fraction)) if available else None


def _output_dtype(model: Any, method: str, dtype: str, notes: list[str]) -> str:
    """merged_16bit with ``dtype="auto"``: always 16 bits (as the name promises)."""
    if dtype != "auto" or method != "merged_16bit":
        return dtype
    config = model.get_base_model().config
    quant = _quantization(config)
    compute = quant.get("bnb_4bit_compute_dtype") if quant else None
    floats = {p.dtype for p in model.get_base_model().parameters() if p.is_floating_point()}
    source = str(compute).removeprefix("torch.") if compute else (
        "float16" if torch.float16 in floats else "bfloat16" if torch.bfloat16 in floats
        else "float32")
    chosen = source if source in ("float16", "bfloat16") else "bfloat16"
    notes.append(f"merged_16bit: writing {chosen}" + (
        f" (the base computes in {source}; pass `dtype=float32` to keep that)"
        if chosen != source else ""))
    return chosen


def _quantization(config: Any) -> dict:
    """The model's bitsandbytes quantization_config as a dict ({} when not quantized)."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return {}
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    return quant if quant.get("quant_method") == "bitsandbytes" else {}


def _work_folder(out: Path, temporary_location: str | os.PathLike | None) -> Path:
    """The stable temporary folder of one output (so a rerun reuses it and resumes)."""
    root = Path(temporary_location) if temporary_location else out.absolute().parent
    tag = hashlib.sha256(str(out.absolute()).encode()).hexdigest()[:8]
    folder = root / f"{LIVE_WORK_PREFIX}{out.name}-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------- the adapter


def save_live_adapter(model: Any, folder: Path, tokenizer: Any = None) -> Path:
    """Save the live model's active adapter (PEFT's ``save_pretrained``) and the tokenizer into
    ``folder``, each file stored as a content-addressed blob (see :func:`as_blob`). Returns
    ``folder``."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, selected_adapters=list(model.active_adapters),
                          safe_serialization=True)
    nested = folder / model.active_adapters[0]
    if not (folder / "adapter_config.json").is_file() and nested.is_dir():
        for path in nested.iterdir():  # PEFT nests a non-default adapter's files
            path.rename(folder / path.name)
        nested.rmdir()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            as_blob(path)
    return folder


def as_blob(path: Path, sha256: str | None = None) -> Path:
    """Move a file to ``<work folder>/blobs/<sha256>`` and leave a relative symlink in its place,
    the layout of the Hugging Face cache: the merge plan then identifies the input by its
    content (:func:`mergeflow.storage.hashing.file_identity`), not its mtime, so the same live weights
    written again give the same plan - a rerun resumes, or finds the output up to date - and
    the manifest's input sha256 costs no second read."""
    blobs = path.parent.parent / "blobs"
    blobs.mkdir(exist_ok=True)
    digest = sha256 or sha256_file(path)
    blob = blobs / digest
    os.replace(path, blob)
    path.symlink_to(os.path.relpath(blob, path.parent))
    return blob


# --------------------------------------------------------------------------- the base


def live_base_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The live base's tensors in their stored (checkpoint) form, by checkpoint name.

    PEFT's wrappers are looked through (``base_layer``, ``original_module``; ``lora_*``,
    ``modules_to_save`` copies and trainable-token deltas are the adapter's, so dropped); a
    bitsandbytes layer gives its packed weight and quant-state siblings, as save_pretrained
    writes them; a tensor sharing memory with an earlier one (a tied head) is left out. No
    tensor is copied (the values are the live storage, on its device).
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, torch.dtype, tuple[int, ...]]] = set()
    for key, tensor in model.get_base_model().state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") or p == "modules_to_save" or "trainable_tokens" in p
               for p in parts):
            continue
        name = ".".join(p for p in parts if p not in ("base_layer", "original_module",
                                                       "token_adapter"))
        tensor = tensor.detach()
        if type(tensor) is not torch.Tensor:
            tensor = tensor.as_subclass(torch.Tensor)  # bitsandbytes' Params4bit / Int8Params
        if tensor.numel():
            shared = (tensor.untyped_storage().data_ptr() + tensor.storage_offset()
                      * tensor.element_size(), tensor.dtype, tuple(tensor.shape))
            if shared in seen:
                continue
            seen.add(shared)
        if name in out:
            raise InputError(f"{key}: two live tensors map to the checkpoint name {name}; this "
                             "PEFT wrapping is not supported by save_pretrained_merged")
        out[name] = tensor
    return out


def _choose_base(model: Any, work: Path, method: str, base: str | os.PathLike | None,
                 allow_download: bool, merge_onto: str, original_base: str | os.PathLike | None,
                 notes: list[str]) -> tuple[Path, dict[str, Any]]:
    """The base folder to merge from (on disk, or the live weights spilled into ``work``) and
    the extra merge options that go with it (``merge_onto``, ``original_base``)."""
    live = live_base_tensors(model)
    quantized = bool(_quantization(model.get_base_model().config))
    if merge_onto not in ("dequantized", "original"):
        raise OptionsError(f"`merge_onto={merge_onto}`: use `merge_onto=dequantized` or "
                           "`merge_onto=original`")
    if merge_onto == "original" and not quantized:
        raise InputError("`merge_onto=original`: the live base is not quantized, so its weights "
                         "are the original ones; drop `merge_onto`")
    explicit = base is not None and str(base) != MEMORY
    candidates = [Path(_resolve_ref(str(base), True))] if explicit else (
        [] if str(base) == MEMORY else _disk_candidates(model, allow_download))
    for folder in candidates:
        problem = base_mismatch(folder, live, model)
        if problem is None:
            notes.append(f"base: read from {folder} (checked against the live model)")
            return folder, {}
        if explicit and not (quantized and _is_original_of(folder, live)):
            raise InputError(f"base={base}: is not the base of the live model: {problem}. Pass "
                             "the folder the model was loaded from, or `base=memory` to merge "
                             "from the live weights")
        if quantized and _is_original_of(folder, live):
            return _quantized_at_load(model, work, folder, method, merge_onto, original_base,
                                      live, notes)
        notes.append(f"base: {folder} is not the live model's base ({problem}); merging from "
                     "the live weights instead")
    if merge_onto == "original" and original_base is None:
        raise InputError("`merge_onto=original` needs the 16-bit checkpoint the base was "
                         "quantized from: pass `original_base=PATH`")
    spilled = spill_base(model, work / "base", live)
    notes.append(f"base: the live weights, spilled to {spilled} (the base is not on disk)")
    extra = {"merge_onto": merge_onto}
    if original_base is not None:
        extra["original_base"] = str(original_base)
    _note_merge_onto(quantized, merge_onto, notes)
    return spilled, extra


def _quantized_at_load(model: Any, work: Path, original: Path, method: str, merge_onto: str,
                       original_base: str | os.PathLike | None, live: dict[str, torch.Tensor],
                       notes: list[str]) -> tuple[Path, dict[str, Any]]:
    """A base quantized when it was loaded: the disk holds the 16-bit original it came from."""
    original_base = original_base or original
    if merge_onto == "original" and method == "merged_16bit":
        notes.append(f"merge onto: the original 16-bit weights of {original_base} "
                     "(`merge_onto=original`), read from disk")
        return Path(original_base), {}
    spilled = spill_base(model, work / "base", live)
    notes.append(f"base: quantized at load from {original}; its quantized weights spilled to "
                 f"{spilled}")
    _note_merge_onto(True, merge_onto, notes)
    extra: dict[str, Any] = {"merge_onto": merge_onto}
    if merge_onto == "original":
        extra["original_base"] = str(original_base)
    return spilled, extra


def _note_merge_onto(quantized: bool, merge_onto: str, notes: list[str]) -> None:
    if quantized:
        notes.append("merge onto: " + ("the dequantized 4-bit/8-bit weights the adapter was "
                                       "trained against (`merge_onto=original` for the 16-bit "
                                       "ones)" if merge_onto == "dequantized"
                                       else "the original 16-bit weights (`merge_onto=original`)"))


def _resolve_ref(ref: str, allow_download: bool) -> str:
    """A local folder for a base reference (a folder, ``hf://org/name`` or ``org/name``)."""
    if Path(ref).is_dir():
        return ref
    if ref.startswith("s3://"):
        from mergeflow.remote.fetch import resolve_source

        return str(resolve_source(ref))
    folder = _hub_snapshot(ref.removeprefix("hf://"), allow_download)
    if folder is None:
        raise InputError(f"base={ref}: not a folder and not in the local Hugging Face cache; "
                         "pass a folder, or `allow_download=True` to fetch it")
    return str(folder)


def _disk_candidates(model: Any, allow_download: bool) -> list[Path]:
    """Folders that may hold the live model's base: its name_or_path and the adapter's
    base_model_name_or_path, as folders or as Hub ids found in the local cache."""
    config = model.peft_config[model.active_adapters[0]]
    refs = [getattr(model.get_base_model(), "name_or_path", None),
            getattr(config, "base_model_name_or_path", None)]
    found: list[Path] = []
    for ref in dict.fromkeys(r for r in refs if r):
        folder = Path(ref) if Path(ref).is_dir() else _hub_snapshot(ref, allow_download)
        if folder is not None and folder not in found:
            try:
                Checkpoint(folder)
            except CheckpointError:
                continue  # e.g. a .bin-only checkpoint: merge from the live weights
            found.append(folder)
    return found


def _hub_snapshot(repo_id: str, allow_download: bool) -> Path | None:
    """The local snapshot of a Hub model (offline unless ``allow_download``), or None."""
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=not allow_download,
                                   allow_patterns=["*.safetensors", "*.json", "tokenizer*",
                                                   "*.model", "*.txt", "*.jinja"])
    except Exception:  # not cached, not a repo id, offline: not on disk
        return None
    return Path(folder)


def base_mismatch(folder: Path, live: dict[str, torch.Tensor], model: Any) -> str | None:
    """Why the checkpoint in ``folder`` is not the live model's base (None: it is).

    The live tensors are named as in memory; the checkpoint may name and shape them otherwise
    (a Llava checkpoint's ``language_model.model.*``, a Mixtral checkpoint's per-expert ``w1``
    stacked into ``experts.gate_up_proj`` in memory). The checkpoint's own model map
    (:func:`mergeflow.model.layout.read_layout`, transformers' conversion mapping) says which disk
    tensors hold each live tensor and where. Checks that the disk tensors are exactly those
    pieces, and compares the first, middle and last rows of every disk tensor with the live
    values at the piece's place (a disk float tensor cast to the live dtype must be equal: that
    is how transformers loaded it). Three rows per tensor: cheap for any model size, though a
    change confined to other rows goes unseen.
    """
    try:
        disk = Checkpoint(folder)
        pieces = _live_pieces(folder, disk, live)
    except MergeError as exc:
        return str(exc)
    held = {p.disk for found in pieces.values() for p in found}
    missing = sorted(set(disk.tensors) - held)
    extra = sorted(n for n, found in pieces.items()
                   if any(p.disk not in disk.tensors for p in found))
    if missing or extra:
        return (f"{len(missing)} tensor(s) only on disk ({', '.join(missing[:3])}) and "
                f"{len(extra)} only in the live model ({', '.join(extra[:3])})")
    for name, found in pieces.items():
        for piece in found:
            if tuple(disk.tensors[piece.disk].shape) != piece.shape:
                return (f"{piece.disk} is {list(disk.tensors[piece.disk].shape)} on disk but "
                        f"{list(piece.shape)} in the live {name}")
    for name, found in sorted(pieces.items()):
        for piece in sorted(found, key=lambda p: p.disk):
            problem = _rows_differ(disk, piece, live[name])
            if problem is not None:
                return problem
    return None


def _live_pieces(folder: Path, disk: Checkpoint,
                 live: dict[str, torch.Tensor]) -> dict[str, list[Piece]]:
    """Each live tensor (in-memory name) -> the disk tensors of ``folder`` that hold it, by the
    checkpoint's model map; a tensor transformers neither renames nor converts is its own
    single piece (so a checkpoint transformers cannot build is compared name for name)."""
    from mergeflow.model.config import base_config
    from mergeflow.model.layout import read_layout

    shapes = {n: tuple(i.shape) for n, i in disk.tensors.items()}
    model_map = read_layout(folder, set(shapes), base_config(folder), shapes).model_map
    found: dict[str, list[Piece]] = {}
    for name, tensor in live.items():
        shape = tuple(tensor.shape)
        converted = model_map.pieces.get(name)
        if converted is not None and not (len(converted) == 1 and converted[0].identity):
            found[name] = model_map.pieces_of(name, shape)  # checked to cover it exactly once
        else:  # the live shape: a renamed tensor must have it on disk too
            disk_name = converted[0].disk if converted else name
            found[name] = [Piece(disk_name, shape, tuple(Axis(0, i) for i in range(len(shape))))]
    return found


def _rows_differ(disk: Checkpoint, piece: Piece, tensor: torch.Tensor) -> str | None:
    """Compare the first, middle and last rows of the disk tensor ``piece.disk`` with the live
    ``tensor`` at the piece's place; why they differ, or None."""
    shape = piece.shape
    if not shape or not shape[0]:
        return None
    for start in sorted({0, shape[0] // 2, shape[0] - 1}):
        stored = disk.read_rows(piece.disk, start, start + 1)  # (1, *shape[1:])
        value = _piece_rows(tensor, piece, start, start + 1).to("cpu")
        if stored.dtype != value.dtype and not (stored.is_floating_point()
                                                and value.is_floating_point()):
            return f"{piece.disk} is {stored.dtype} on disk but {value.dtype} live"
        if not torch.equal(stored.to(value.dtype), value):
            return f"{piece.disk} row {start} differs between disk and the live model"
    return None


def _piece_rows(tensor: torch.Tensor, piece: Piece, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the disk tensor ``piece`` as the live ``tensor`` holds them: shape
    ``(stop - start, *piece.shape[1:])``, a view of ``tensor`` (no copy).

    Memory dimension ``i`` is indexed ``axes[i].offset + axes[i].stride * j`` by disk dimension
    ``axes[i].source`` (or fixed at ``offset``); the view's dimensions are then put back in the
    disk's order."""
    index: list[int | slice] = []
    order: list[int] = []  # the disk dimension of each dimension of the view
    for axis in piece.axes:
        if axis.source is None:
            index.append(axis.offset)
            continue
        lo, hi = (start, stop) if axis.source == 0 else (0, piece.shape[axis.source])
        index.append(slice(axis.offset + axis.stride * lo,
                           axis.offset + axis.stride * (hi - 1) + 1, axis.stride))
        order.append(axis.source)
    view = tensor[tuple(index)]
    return view.permute([order.index(d) for d in range(len(piece.shape))])


def _is_original_of(folder: Path, live: dict[str, torch.Tensor]) -> bool:
    """Whether ``folder`` holds an unquantized checkpoint with the live quantized base's
    logical tensor names (the 16-bit model it was quantized from at load)."""
    from mergeflow.model.config import base_config

    try:
        disk = Checkpoint(folder)
        if _quantization(types.SimpleNamespace(**base_config(folder))):
            return False
    except (CheckpointError, InputError):
        return False
    logical = {n: t for n, t in live.items() if not _is_quant_sibling(n, live)}
    try:  # the disk tensors that hold the logical ones (names only: the live ones are packed)
        held = {p.disk for found in _live_pieces(folder, disk, logical).values() for p in found}
    except MergeError:
        return False
    return set(disk.tensors) == held


def _is_quant_sibling(name: str, live: dict[str, torch.Tensor]) -> bool:
    for suffix in (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"):
        if name.endswith(suffix) and name[: -len(suffix)] in live:
            return True
    if ".quant_state.bitsandbytes__" in name:
        return True
    return name.endswith((".SCB", ".weight_format"))


def spill_base(model: Any, folder: Path, live: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the live base, in its stored form, as a SafeTensors checkpoint in ``folder``.

    Each tensor goes to the file in row blocks of about 24 MiB (moved to the host one block at
    a time), so host memory stays near one block; config.json (with ``quantization_config``)
    and generation_config.json come from the live model; every file is a content-addressed blob
    (:func:`as_blob`). Returns ``folder``.
    """
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    live = live if live is not None else live_base_tensors(model)
    specs = []
    for name, tensor in live.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise InputError(f"{name}: live dtype {tensor.dtype} cannot be stored in SafeTensors")
        specs.append((name, DTYPE_NAMES[tensor.dtype], list(tensor.shape)))
    path = folder / SPILL_FILE
    with ShardWriter(path, specs) as writer:
        for (name, dtype, shape), tensor in zip(specs, live.values(), strict=True):
            writer.begin(name, dtype, shape)
            for block in _row_blocks(tensor):
                writer.append(block)
            writer.end()
    as_blob(path, writer.sha256)
    base = model.get_base_model()
    (folder / "config.json").write_text(base.config.to_json_string(use_diff=False))
    as_blob(folder / "config.json")
    generation = getattr(base, "generation_config", None)
    if generation is not None and base.can_generate():
        (folder / "generation_config.json").write_text(generation.to_json_string())
        as_blob(folder / "generation_config.json")
    return folder


def _row_blocks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensor as CPU row blocks of about SPILL_BLOCK bytes (views when already on the CPU)."""
    if tensor.dim() == 0:
        yield tensor.reshape(1).to("cpu")
        return
    rows = tensor.shape[0]
    row_bytes = max(1, tensor[0].numel() * tensor.element_size()) if rows else 1
    step = max(1, SPILL_BLOCK // row_bytes)
    for start in range(0, rows, step):
        yield tensor[start:start + step].to("cpu").contiguous()


__all__ = ["SAVE_METHODS", "as_blob", "base_mismatch", "live_base_tensors", "patch",
           "push_to_hub_merged", "save_live_adapter", "save_pretrained_merged", "spill_base"]
