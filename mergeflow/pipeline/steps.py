"""The pipeline's steps: prepare, run each shard, finalize, verify, publish, upload (and the
low-disk and GGUF variants). :mod:`mergeflow.pipeline.order` says which run and in what order.

The steps take and return paths and small models only, so an orchestrator (the Prefect flow in
``flows/``) can run shards as separate tasks, in parallel, on other machines, and resume them.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from mergeflow import faults
from mergeflow.engine.ops import TensorMerger
from mergeflow.engine.shards import Progress, open_merger, write_shard
from mergeflow.errors import (
    NOTHING_STAGED,
    DiskSpaceError,
    InputError,
    MergeError,
    NotEnoughDiskSpace,
    OptionsError,
    TransientError,
    TransientUploadError,
    UploadError,
    VerificationError,
    disk_full_error,
    staging_kept,
)
from mergeflow.model.adapter import CONFIG_FILE as ADAPTER_CONFIG
from mergeflow.model.adapter import Adapter, load_adapter, read_adapter_config
from mergeflow.model.checkpoint import INDEX_FILES, Checkpoint
from mergeflow.model.config import base_config, read_base_config, text_config
from mergeflow.model.layout import ModelLayout, PendingLayout, start_layout
from mergeflow.model.quant import QuantizedBase, detect
from mergeflow.model.stack import WEIGHTS as STACK_WEIGHTS
from mergeflow.model.stack import stack_adapters
from mergeflow.model.vocab import set_config_field
from mergeflow.model.wrappers import Wrapped, cached_param_wrappers, read_param_wrappers
from mergeflow.output.folder import (
    INDEX_FILE,
    MANIFEST,
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    check_existing_output,
    check_output_location,
    copy_processor,
    copy_tokenizer,
    find_tokenizer,
    hub_base_model,
    model_card,
    output_config,
    read_manifest,
    write_json,
)
from mergeflow.output.modelfile import MODELFILE, write_modelfile
from mergeflow.pipeline import preflight, resources
from mergeflow.pipeline.ahead import MergeAhead
from mergeflow.pipeline.results import MergeReport, PreparedMerge, ShardResult, VerifyReport
from mergeflow.pipeline.verification import verify_output, verify_shard
from mergeflow.plan import (
    DTYPE_CHOICES,
    BaseTensor,
    MergePlan,
    Planner,
    ShardPlan,
    TensorPlan,
    parse_size,
    resolve_dtype,
)
from mergeflow.remote.fetch import base_from_adapter, resolve_source
from mergeflow.remote.publish import PublishResult, open_publisher
from mergeflow.remote.publish import publish as publish_folder
from mergeflow.spec import MergeSpec
from mergeflow.storage.confine import check_confined, confined_file
from mergeflow.storage.hashing import (
    HashCache,
    InputHashes,
    fingerprint_files,
    identify_files,
    pause_hashing,
    sha256_file,
    start_hashes,
)
from mergeflow.storage.staging import (
    Staging,
    atomic_write,
    durable_rename,
    fsync_file,
    remove_unplanned,
)
from mergeflow.version import __version__

DTYPE_LABELS = {v: k for k, v in DTYPE_CHOICES.items()}


def _resolve_tokenizer(spec: MergeSpec, adapter: Path, base: Path) -> Path | None:
    if spec.no_tokenizer:
        return None
    if spec.tokenizer is not None:
        folder = Path(spec.tokenizer)
        if find_tokenizer([folder]) is None:
            raise InputError(f"`tokenizer={folder}`: holds no tokenizer.json or "
                             "tokenizer_config.json")
        return folder
    folder = find_tokenizer([adapter, base])
    if folder is None:
        raise InputError(
            f"no tokenizer in {adapter} or {base}: pass `tokenizer=PATH` (the tokenizer you "
            "trained with), or `no_tokenizer=True` to publish a model without one"
        )
    return folder


def tokenizer_length(folder: Path) -> int:
    """``len(tokenizer)``: the token ids the model must be able to embed (computed without
    transformers where possible; see :mod:`mergeflow.model.tokenizer`)."""
    from mergeflow.model.tokenizer import tokenizer_length as length

    return length(folder)


def _input_files(base: Checkpoint, adapter: Adapter, tokenizer: Path | None,
                 original: Checkpoint | None = None) -> dict[str, tuple[Path, list[str]]]:
    """Every input file that determines the output, by role: (folder, file names)."""
    files = {"base": (base.folder, [*base.files, "config.json", "generation_config.json",
                                    *INDEX_FILES]),
             "adapter": (adapter.folder, [adapter.weights_file, "adapter_config.json"])}
    if tokenizer is not None:
        files["tokenizer"] = (tokenizer, list(TOKENIZER_FILES))
    if original is not None:
        files["original"] = (original.folder, [*original.files, "config.json", *INDEX_FILES])
    return files


def _start_input_hashes(files: dict[str, tuple[Path, list[str]]], read_here: bool) -> InputHashes:
    """Identify the inputs as the plan records them (size and mtime, or a cache-known sha256),
    so planning never waits for a hash, and start their sha256 for the manifest: the weights the
    merge reads in this process (``read_here``) from those very reads, the rest on a background
    thread (:func:`mergeflow.storage.hashing.start_hashes`)."""
    identities = {role: identify_files(folder, names) for role, (folder, names) in files.items()}
    paths = [folder / name for role, (folder, _) in files.items() for name in identities[role]]
    read = {files[role][0] / name for role in ("base", "original") if read_here and role in files
            for name in identities[role]}
    return start_hashes(identities, [p for p in paths if p in read],
                        [p for p in paths if p not in read])


def _input_sha256(plan: MergePlan) -> dict[str, dict[str, str]]:
    """sha256 of every input file the plan identifies (from the memo, the background hashes
    or the Hugging Face cache's blob names when possible)."""
    folders = {"base": plan.base, "adapter": plan.adapter, "original": plan.original,
               "tokenizer": plan.options.get("tokenizer")}
    cache = HashCache()
    sums = {role: fingerprint_files(Path(str(folders[role])), list(names), cache)
            for role, names in plan.inputs.items()}
    cache.save()
    return sums


def resolve_inputs(spec: MergeSpec) -> tuple[Path, Path]:
    """Local folders for the adapter and the base (``hf://`` and ``s3://`` are fetched into the
    cache); without ``spec.base``, the base is the one the adapter's config names.

    Raises:
        InputError: a reference cannot be resolved, or no base is given or named.
        TransientError: the network failed in a way worth retrying.
    """
    adapter_dir = resolve_source(spec.adapter)
    base_ref = spec.base or base_from_adapter(adapter_dir)
    if not base_ref:
        raise InputError(f"{adapter_dir / 'adapter_config.json'}: base_model_name_or_path is "
                         "empty; pass `base=PATH` (or hf://org/name, s3://bucket/prefix)")
    if spec.stack:  # the adapters' sum, written once as one adapter (mergeflow.model.stack)
        folders = [adapter_dir, *(resolve_source(ref) for ref in spec.stack)]
        for folder in folders:
            check_confined(folder, [ADAPTER_CONFIG, STACK_WEIGHTS])
        adapter_dir = stack_adapters(folders)
    return resolve_source(base_ref), adapter_dir


def _disk_full_is_disk_space_error(staging_of: Callable[..., str | Path | None]):
    """Decorate a step that writes: a full disk (ENOSPC / EDQUOT) escaping it as an ``OSError``
    becomes a :class:`DiskSpaceError` naming the file, and every DiskSpaceError of the step says
    that the staging folder (``staging_of(*args, **kwargs)``; None: nothing staged yet) is kept
    and a rerun resumes. The preflight's refusal (:class:`NotEnoughDiskSpace`) passes as it is."""
    def decorate(step):
        @functools.wraps(step)
        def run(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            except NotEnoughDiskSpace:
                raise
            except (DiskSpaceError, OSError) as exc:
                staging = staging_of(*args, **kwargs)
                kept = staging_kept(staging) if staging is not None else NOTHING_STAGED
                if isinstance(exc, DiskSpaceError):
                    if "staging folder" in str(exc):
                        raise
                    raise DiskSpaceError(f"{exc}; {kept}") from exc
                error = disk_full_error(exc, staging or "the disk", kept)
                if error is None:
                    raise
                raise error from exc
        return run
    return decorate


def _staging_of_plan(plan_path: str | Path, *args, **kwargs) -> Path:
    return Staging.from_plan(plan_path).folder


def _staging_of_prepared(prepared: PreparedMerge, *args, **kwargs) -> str:
    return prepared.staging


def publish_options(spec: MergeSpec) -> dict[str, object]:
    """The sink options a spec sets (None: not set, so not passed)."""
    return {"private": spec.private or None, "revision": spec.revision,
            "create_pr": spec.create_pr or None, "commit_message": spec.commit_message,
            "sse": spec.s3_sse, "kms_key_id": spec.s3_kms_key_id}


def upload(spec: MergeSpec) -> PublishResult:
    """Publish the finished output folder to ``spec.push_to`` (skipping what is already there).

    Raises:
        SinkError: the destination cannot be used; TransientError: worth retrying.
    """
    return publish_folder(Path(spec.out), spec.push_to, **publish_options(spec))


def upload_error(spec: MergeSpec, exc: MergeError) -> UploadError:
    """A failed :func:`upload` of an output already published to ``spec.out``, as the error
    that says what is published and what is not (transient when ``exc`` was)."""
    kind = TransientUploadError if isinstance(exc, TransientError) else UploadError
    return kind(f"{spec.out} is published and holds the finished merge, but publishing it to "
                f"{spec.push_to} failed, so {spec.push_to} does not hold it (its manifest goes "
                f"last): {exc}. Rerun the same command to upload it; the merge is not redone")


def upload_published(spec: MergeSpec) -> PublishResult:
    """:func:`upload`, once ``spec.out`` is published.

    Raises:
        UploadError: saying what is published and what is not (TransientUploadError when the
            cause was transient).
    """
    try:
        return upload(spec)
    except MergeError as exc:
        raise upload_error(spec, exc) from exc


@_disk_full_is_disk_space_error(lambda spec: None)
def prepare(spec: MergeSpec, ahead: bool = False) -> PreparedMerge:
    """Read headers, plan and validate the whole merge, and set up its staging folder.

    ``ahead``: while a new base's layout is learnt, merge shards from the plan ``config.json``
    alone gives, in this process, and keep those the real plan plans the same way
    (:mod:`mergeflow.pipeline.ahead`; listed in :attr:`PreparedMerge.written_ahead`). For a
    route that runs the shards in this process next.

    Raises:
        InputError: any problem with the inputs or the output location, before a byte is written
            (shards merged ahead are deleted).
    """
    _check_method_options(spec)
    base_dir, adapter_dir = resolve_inputs(spec)
    out = Path(spec.out)
    original_dir = resolve_source(spec.original_base) if spec.original_base else None
    check_output_location(out, [base_dir, adapter_dir, *([original_dir] if original_dir else [])])
    config = base_config(base_dir)
    base = Checkpoint(base_dir)
    quantized = detect(config, base)
    _check_quantized_options(spec, quantized)
    original, original_config = _open_original(original_dir)
    adapter = load_adapter(adapter_dir)
    dtype = _output_dtype(spec, config, base, quantized, original, original_config)
    tokenizer = _resolve_tokenizer(spec, adapter_dir, base_dir)
    inputs = _input_files(base, adapter, tokenizer, original)
    for folder, names in inputs.values():
        check_confined(folder, names)  # no input file is a link out of its folder
    check_confined(base_dir, PROCESSOR_FILES)
    if spec.writes_gguf:  # refused here, before a byte is written
        from mergeflow.engine.gguf import check_supported

        check_supported(base_dir, tokenizer, spec.gguf_type)
    # A new base's layout is learnt in a child process (transformers' model code never enters
    # this one), while the base is hashed for the manifest here (idle time first, then the
    # merge's reads).
    pause_hashing()  # the hashing begun before planning stops while the layout's child forks
    layout, wrapped = _start_layout(base, config, quantized, adapter)
    try:
        hashes = _start_input_hashes(inputs, read_here=spec.dask_address is None)
    except BaseException:
        layout.cancel()
        raise
    early = None
    try:
        plan_with = _planner(spec, base, adapter, config, quantized, original, dtype, tokenizer)
        if ahead:
            early = _merge_ahead(spec, out, adapter, layout, plan_with)
        plan = plan_with(layout.result(), wrapped())
        if early is not None:
            early.stop(plan)  # the shard being written goes on only if the plan keeps it
        plan.inputs = hashes.identities
        plan.options = {"dtype": dtype, "max_shard_size": parse_size(spec.max_shard_size),
                        "pad_vocab_to_multiple_of": spec.pad_vocab_to_multiple_of,
                        "allow_vocab_shrink": spec.allow_vocab_shrink,
                        "tokenizer": str(tokenizer) if tokenizer else None, "device": spec.device,
                        "save_method": spec.save_method, "merge_onto": spec.merge_onto,
                        "original_base": str(original_dir) if original_dir else None,
                        "mergeflow": __version__,
                        **({"gguf_type": spec.gguf_type} if spec.writes_gguf else {}),
                        **({"fp8_scheme": spec.fp8_scheme} if spec.save_method == "fp8" else {})}
        plan.runtime = _runtime(spec)
        kept = early.finish() if early is not None else []
        prepared = _stage(spec, plan, adapter, out, written=sum(r.size for r in kept))
        if kept and not prepared.up_to_date:
            early.move_into(Staging.for_output(out), kept)
            prepared = prepared.model_copy(update={"written_ahead": kept})
    except BaseException:
        layout.cancel()
        hashes.cancel()  # nothing will be merged: stop hashing the inputs for it
        raise
    finally:
        if early is not None:
            early.discard()
    if prepared.up_to_date:
        hashes.cancel()  # nor here: the output's manifest already lists them
    return prepared


def _runtime(spec: MergeSpec) -> dict[str, object]:
    """How the plan's shards are run (within the memory budget): never changes a byte."""
    decided = resources.for_spec(spec)
    return {"block_bytes": decided.block_bytes, "workers": decided.workers}


def _merge_ahead(spec: MergeSpec, out: Path, adapter: Adapter, layout: PendingLayout,
                 plan_with: Callable[[ModelLayout], MergePlan]) -> MergeAhead | None:
    """Shards merged from the provisional plan while the layout's child learns a new base's
    layout (:mod:`mergeflow.pipeline.ahead`), into a fresh output with room for them on its
    disk; None where nothing is to be gained or it cannot be planned yet (the real plan then
    says why)."""
    staging = Staging.for_output(out)
    if (not layout.learning or adapter.config.target_parameters or spec.low_disk
            or not spec.writes_safetensors or spec.dask_address
            or out.exists() or staging.folder.exists()):  # a resume or a rerun: not ahead
        return None
    try:
        plan = plan_with(layout.provisional())
        # room for the whole output twice: a merge ahead never fills a disk the merge fits on
        needed = 2 * preflight.required_bytes(plan, out) + preflight.min_free_bytes()
        if shutil.disk_usage(out.parent).free < needed:
            return None
        plan.runtime = _runtime(spec)
        # One worker on the cores the layout's child leaves: more torch threads than cores
        # would spin (OpenMP) against the child. The run sets its own (run_shards).
        cpus = max(1, resources.usable_cpus() - 1)
        resources.apply_threads(resources.running(resources.for_spec(spec), 1, cpus=cpus))
        return MergeAhead(plan, staging.ahead, spec.device)
    except Exception:  # any: the real plan, or its run, reports what is wrong
        return None


def _start_layout(base: Checkpoint, config: dict, quantized: QuantizedBase | None,
                  adapter: Adapter) -> tuple[PendingLayout, Callable[[], Wrapped | None]]:
    """The model's layout (its own code, cached), started (see :func:`start_layout`), and a
    function giving PEFT's wrapped parameters when the adapter targets parameters (cached, else
    asked in the layout's child: :func:`read_param_wrappers`), None otherwise."""
    view = quantized.logical_view(base) if quantized is not None else base
    ask = None
    known = None
    if adapter.config.target_parameters:
        known = cached_param_wrappers(base.folder, adapter.folder)
        if known is None:
            ask = functools.partial(read_param_wrappers, base.folder, adapter.folder)
    layout = start_layout(base.folder, set(view.tensors), config,
                          {n: tuple(i.shape) for n, i in view.tensors.items()}, extra=ask)
    if ask is not None:
        return layout, lambda: cast("Wrapped", layout.extra())
    return layout, lambda: known


def _planner(spec: MergeSpec, base: Checkpoint, adapter: Adapter, config: dict,
             quantized: QuantizedBase | None, original: Checkpoint | None, dtype: str,
             tokenizer: Path | None) -> Callable[..., MergePlan]:
    """The plan from the opened inputs, as a function of the model's layout and PEFT's wrapped
    parameters (when the adapter targets parameters); the tokenizer's length is read once."""
    tokenizer_len = tokenizer_length(tokenizer) if tokenizer else None

    def plan(layout: ModelLayout, wrapped: Wrapped | None = None) -> MergePlan:
        return Planner(base, adapter, layout, dtype, parse_size(spec.max_shard_size),
                       tokenizer_len=tokenizer_len,
                       pad_to_multiple_of=spec.pad_vocab_to_multiple_of,
                       allow_vocab_shrink=spec.allow_vocab_shrink,
                       vocab_size=text_config(config).get("vocab_size"),
                       save_method=spec.planned_method, original=original,
                       quantized=quantized, wrapped=wrapped, fp8_scheme=spec.fp8_scheme).plan()

    return plan


def _stage(spec: MergeSpec, plan: MergePlan, adapter: Adapter, out: Path,
           written: int = 0) -> PreparedMerge:
    """Check the plan against the adapter's values, the disk and an existing output, and set up
    the staging folder (unless the output is already up to date). ``written``: bytes of its
    shards already on the output's disk, written ahead (:mod:`mergeflow.pipeline.ahead`)."""
    if spec.writes_gguf:
        _check_convertible(plan, Path(plan.base))
    warnings = preflight.check(plan, adapter, out, low_disk=spec.low_disk,
                               written=written)  # values, free disk
    plan.notes.extend(w for w in warnings if w not in plan.notes)  # before the fingerprint
    fingerprint = plan.fingerprint()
    up_to_date = check_existing_output(out, fingerprint, spec.overwrite, deep=bool(spec.push_to))
    staging = Staging.for_output(out)
    if up_to_date:
        staging.clear_leftovers()
    else:
        _prepare_staging(staging, plan, fingerprint)
    return PreparedMerge(out=str(out), staging=str(staging.folder),
                         plan_path=str(staging.plan_path), fingerprint=fingerprint,
                         up_to_date=up_to_date, shard_count=len(plan.shards),
                         tensor_count=plan.tensor_count, total_size=plan.total_size)


def _check_method_options(spec: MergeSpec) -> None:
    """Option combinations that cannot mean anything, declared by the spec
    (:meth:`MergeSpec.option_problems`): checked again here, since an updated copy of a spec
    (``model_copy(update=...)``) is not validated."""
    problems = spec.option_problems()
    if problems:
        raise OptionsError("; ".join(problems))


def _check_quantized_options(spec: MergeSpec, quantized: QuantizedBase | None) -> None:
    if quantized is not None and quantized.method == "mxfp4" and spec.save_method == "merged_4bit":
        raise InputError(f"`save_method=merged_4bit` re-quantizes in the base's own format, but "
                         f"Mergeflow does not write MXFP4 (the base {spec.base}); use "
                         "`save_method=merged_16bit`, or `fp8`")
    if quantized is not None:
        return
    if spec.merge_onto == "original":
        raise InputError(f"`merge_onto=original`: the base {spec.base} is not quantized, so its "
                         "weights are the original ones; drop `merge_onto` and `original_base`")
    if spec.save_method == "merged_4bit":
        raise InputError(f"`save_method=merged_4bit` re-quantizes with the base's own "
                         f"bitsandbytes settings, but the base {spec.base} is not quantized "
                         "(its config.json has no quantization_config); use `save_method=merged_16bit`")


def _open_original(folder: Path | None) -> tuple[Checkpoint | None, dict]:
    """The ``original_base`` checkpoint (headers) and its config; it must not be quantized."""
    if folder is None:
        return None, {}
    config = base_config(folder)
    original = Checkpoint(folder)
    if detect(config, original) is not None:
        raise InputError(f"`original_base={folder}`: is itself quantized; pass the 16-bit "
                         "checkpoint the quantized base was made from")
    return original, config


def _output_dtype(spec: MergeSpec, config: dict, base: Checkpoint,
                  quantized: QuantizedBase | None, original: Checkpoint | None,
                  original_config: dict) -> str:
    """``dtype``, or for "auto": the base's own float dtype; merged onto an original, the
    original's; a quantized base merged to 16 bits, its ``bnb_4bit_compute_dtype`` (bfloat16 for
    an 8-bit base); merged_4bit, and an FP8 base, keep the base's unquantized tensors' dtype."""
    if spec.dtype != "auto" or quantized is None:
        return resolve_dtype(spec.dtype, config, base)
    if original is not None:
        return resolve_dtype("auto", original_config, original)
    if spec.save_method == "merged_4bit" or quantized.method == "fp8":
        return resolve_dtype("auto", config, quantized.logical_view(base))
    return quantized.compute_dtype() or "BF16"


def _prepare_staging(staging: Staging, plan: MergePlan, fingerprint: str) -> None:
    """Reuse a staging folder of the same plan (resume; a new way to run the same merge only
    rewrites the plan); otherwise start it afresh (see :meth:`Staging.begin`)."""
    staging.begin(plan.model_dump_json(indent=1), fingerprint,
                  lambda text: MergePlan.model_validate_json(text).fingerprint())


def finished_shard(staging: Path | str | Staging, filename: str) -> ShardResult | None:
    """A shard a previous run finished, if its file still matches its recorded sha256
    (``staging``: the staging folder, as in :attr:`PreparedMerge.staging`)."""
    if not isinstance(staging, Staging):
        staging = Staging.from_folder(staging)
    record = staging.finished(filename)
    if record is None:
        return None
    try:
        result = ShardResult.model_validate(record)
    except ValueError:
        return None
    return result.model_copy(update={"resumed": True})


@_disk_full_is_disk_space_error(_staging_of_plan)
def run_shard(plan_path: str | Path, index: int, device: str = "cpu",
              source: TensorMerger | None = None, progress: Progress | None = None) -> ShardResult:
    """Write shard ``index`` of a plan into its staging folder (skipped if already finished)."""
    faults.checkpoint("before-shard-recorded")
    plan_path = Path(plan_path)
    staging = Staging.from_plan(plan_path)
    plan = MergePlan.load(plan_path)
    shard = plan.shards[index]
    done = finished_shard(staging, shard.filename)
    if done is not None:
        if progress is not None:
            for tensor in shard.tensors:
                progress(tensor)
        return done
    source = source or open_merger(plan, device=device)
    result = write_shard(shard, source, staging.folder, progress)
    staging.record_done(shard.filename, result.model_dump_json())
    faults.checkpoint("after-shard-recorded")
    return result


def _report(plan: MergePlan, adapter_config: dict, out: str, status: str) -> MergeReport:
    tensors = [t for s in plan.shards for t in s.tensors]
    variant = "DoRA" if adapter_config.get("use_dora") else "LoRA"
    if adapter_config.get("use_rslora"):
        variant = f"rs{variant}"
    save_method = str(plan.options.get("save_method", "merged_16bit"))
    if save_method == "lora":  # the adapter's own tensors, counted by their saved names
        names = [t.name for t in tensors]
        counts = (sum(n.endswith((".lora_A.weight", ".lora_embedding_A")) for n in names),
                  sum("lora_" not in n and "token_adapter" not in n for n in names),
                  sum(n.endswith(".lora_B.bias") for n in names))
    else:
        counts = (sum(t.lora is not None for t in tensors), sum(t.from_adapter for t in tensors),
                  sum(t.lora_bias is not None for t in tensors))
    return MergeReport(
        out=out, status=status, dtype=DTYPE_LABELS.get(plan.dtype, plan.dtype),
        shards=len(plan.shards), tensors=sum(len(t.outputs()) for t in tensors),
        total_size=plan.total_size, lora_modules=counts[0], replaced_tensors=counts[1],
        lora_biases=counts[2], variant=variant, notes=list(plan.notes), save_method=save_method,
    )


@_disk_full_is_disk_space_error(_staging_of_prepared)
def finalize(prepared: PreparedMerge, results: list[ShardResult]) -> MergeReport:
    """Write config, tokenizer, index, model card and - last - the manifest, in staging."""
    staging, out = Path(prepared.staging), Path(prepared.out)
    plan = MergePlan.load(Path(prepared.plan_path))
    base, adapter = Path(plan.base), Path(plan.adapter)
    adapter_config = read_adapter_config(adapter)
    report = _report(plan, adapter_config, str(out), "merged")
    written = ["README.md"]
    if report.save_method == "lora":
        shutil.copyfile(confined_file(adapter, "adapter_config.json"), staging / "adapter_config.json")
        written.append("adapter_config.json")
    else:
        written += _write_model_config(plan, base, staging,
                                       keep_quantization=report.save_method == "merged_4bit")
    tokenizer = plan.options.get("tokenizer")
    if tokenizer:
        written += copy_tokenizer(Path(tokenizer), staging)
    if report.save_method != "lora":
        written += copy_processor(base, staging)
    if len(plan.shards) > 1:
        write_json(staging / INDEX_FILE, {
            "metadata": {"total_size": plan.total_size},
            "weight_map": {name: s.filename for s in plan.shards for t in s.tensors
                           for name, _, _ in t.outputs()},
        })
        written.append(INDEX_FILE)
    _write_card(staging, plan, report)
    planned = {*written, *(s.filename for s in plan.shards)}
    _write_manifest(staging, plan, prepared.fingerprint, report, results, planned)
    report.shards_resumed = sum(r.resumed for r in results)
    return report


def _write_card(staging: Path, plan: MergePlan, report: MergeReport) -> None:
    """The model card (README.md) of a checkpoint or adapter export, with ``report``."""
    base, adapter = Path(plan.base), Path(plan.adapter)
    adapter_config = read_adapter_config(adapter)
    base_model = hub_base_model(base, adapter_config.get("base_model_name_or_path"), adapter)
    (staging / "README.md").write_text(model_card(base_model, adapter.name, report.durable(),
                                                  adapter_only=report.save_method == "lora",
                                                  base_folder=base,
                                                  base_config=read_base_config(base)))


def verify(prepared: PreparedMerge, device: str = "cpu",
           results: list[ShardResult] | None = None) -> VerifyReport:
    """Verify the finalized staging folder against its plan (see :mod:`mergeflow.pipeline.verification`).

    ``results``: the shards this run wrote or checked for resume; their writers' sha256 is
    trusted, so the shards are not read again just to hash them.
    """
    plan = MergePlan.load(Path(prepared.plan_path))
    trusted = {r.filename: r.sha256 for r in results or []}
    # as many threads as the merge had workers, so checking stays within the merge's memory
    threads = int(plan.runtime.get("workers") or 1)
    return verify_output(Path(prepared.staging), plan, lambda: open_merger(plan, device=device),
                         trusted, threads=threads)


@_disk_full_is_disk_space_error(_staging_of_prepared)
def publish_output(prepared: PreparedMerge) -> None:
    """Move the finished staging folder to the output path with one durable rename."""
    Staging.for_output(prepared.out).publish()


def _write_model_config(plan: MergePlan, base: Path, staging: Path, keep_quantization: bool) -> list[str]:
    """config.json (dtype, vocab and tie updates; quantization_config only for merged_4bit)
    and generation_config.json of a merged model; returns the names written."""
    config = output_config(base_config(base), DTYPE_LABELS[plan.dtype], keep_quantization)
    for key, value in plan.config_updates.items():
        if key == "quantization_config":  # the output's own (save_method fp8): top level only
            config[key] = value
        else:
            set_config_field(config, key, value)
    write_json(staging / "config.json", config)
    if not (base / "generation_config.json").is_file():
        return ["config.json"]
    shutil.copyfile(confined_file(base, "generation_config.json"), staging / "generation_config.json")
    return ["config.json", "generation_config.json"]


def _write_manifest(staging: Path, plan: MergePlan, fingerprint: str, report: MergeReport,
                    results: list[ShardResult], planned: set[str]) -> None:
    """The manifest, last: the sha256 of every ``planned`` file. Anything else in the staging
    folder (a file dropped there between a kill and the rerun) is deleted first, so it is never
    published nor listed."""
    # Shards are described by their write results (in low-disk mode they are already shipped
    # and gone); every other file by its bytes on disk.
    files = {r.filename: {"size": r.size, "sha256": r.sha256} for r in results}
    remove_unplanned(staging, planned | {MANIFEST})
    for path in staging.iterdir():
        # A manifest left by a run killed before publishing is about to be replaced.
        if path.is_file() and not path.name.startswith(".") and path.name not in files \
                and path.name != MANIFEST:
            fsync_file(path)  # the manifest may only name data that is on the disk
            files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    files = dict(sorted(files.items()))
    manifest = {
        "format": "mergeflow-manifest/1",
        "mergeflow_version": __version__,
        "plan_fingerprint": fingerprint,
        "files": files,
        "inputs": {"base": plan.base, "adapter": plan.adapter, "sha256": _input_sha256(plan)},
        "options": plan.options,
        "report": report.durable(),
    }
    faults.checkpoint("before-manifest")
    atomic_write(staging / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    faults.checkpoint("after-manifest")


@_disk_full_is_disk_space_error(_staging_of_prepared)
def write_gguf_output(prepared: PreparedMerge, spec: MergeSpec) -> MergeReport:
    """``save_method="gguf"``: stream the merge into one GGUF file in staging (see
    :mod:`mergeflow.engine.gguf`) and check it (``spec.verify``). Types llama.cpp's quantizer
    makes (:mod:`mergeflow.engine.gguf_quant`; several types asked at once) are made from that
    one 16-bit file, each checked, and the 16-bit file is deleted unless it was asked for. Then
    the Ollama Modelfile (for the first type asked), the model card and - last - the manifest.
    :func:`publish_output` publishes it.

    Raises:
        VerificationError: a file read back does not hold the planned tensors.
    """
    staging = Staging.for_output(prepared.out)
    plan = MergePlan.load(Path(prepared.plan_path))
    made = _make_gguf(prepared, spec, plan, staging)
    _write_gguf_modelfile(staging, plan, made.written[0].filename)
    report = _gguf_report(plan, prepared.out, made)
    _write_gguf_card(staging, plan, report)
    _write_manifest(staging.folder, plan, prepared.fingerprint, report, made.written,
                    {*(r.filename for r in made.written), MODELFILE, "README.md"})
    return report


@_disk_full_is_disk_space_error(_staging_of_prepared)
def convert_gguf_output(prepared: PreparedMerge, spec: MergeSpec, results: list[ShardResult],
                        report: MergeReport) -> MergeReport:
    """``save_method="merged_16bit,gguf"``: the GGUF files asked for (``gguf_type``), made as
    :func:`write_gguf_output` makes them, but converted from the finalized (and verified) shards
    in staging instead of from the base: the base is read and merged once, by the shards.
    Each tensor is read back as written, with no LoRA math, so each file is byte for byte the
    one ``save_method="gguf"`` writes for the same inputs (both round the merge to ``dtype``
    first, :func:`mergeflow.engine.gguf.float_blocks`). The files go beside the shards, the
    Ollama Modelfile with them; the model card and - last - the manifest are written again,
    listing every file. ``results``: the shards' write results (not hashed again);
    ``report``: finalize's, returned with the GGUF files and their scores added.

    Raises:
        VerificationError: a GGUF file read back does not hold the planned tensors.
    """
    staging = Staging.for_output(prepared.out)
    plan = MergePlan.load(Path(prepared.plan_path))
    made = _make_gguf(prepared, spec, plan, staging, read_from=_staged_plan(plan, staging.folder))
    report = report.model_copy(update={
        "notes": [*report.notes, *(score.words() for score in made.scores)],
        "gguf_files": {r.filename: r.size for r in made.written},
        "gguf_scores": _scores(made)})
    _write_gguf_modelfile(staging, plan, made.written[0].filename)
    _write_card(staging.folder, plan, report)
    listed = set((read_manifest(staging.folder) or {}).get("files", {}))  # finalize's files
    _write_manifest(staging.folder, plan, prepared.fingerprint, report, [*results, *made.written],
                    {*listed, *(r.filename for r in made.written), MODELFILE})
    return report


@_disk_full_is_disk_space_error(_staging_of_prepared)
def gguf_low_disk(prepared: PreparedMerge, spec: MergeSpec) -> tuple[MergeReport, PublishResult]:
    """``save_method="gguf"`` with ``low_disk``: as :func:`write_gguf_output`, but each GGUF
    file asked for is shipped to ``spec.push_to`` and deleted as soon as it is written and
    checked (and scored), so local disk holds the 16-bit file and one quantized file at most.
    Then the Modelfile, the model card and - last - the manifest are shipped, and the staging
    folder is removed (as :func:`merge_low_disk` does for shards; a rerun makes the files
    again, byte for byte, and the publisher skips those already there).

    Raises:
        VerificationError: a file failed its checks (it is not shipped).
        SinkError, TransientError, UploadError, TransientUploadError: as :func:`merge_low_disk`.
    """
    from mergeflow.engine.gguf import gguf_filename

    staging = Staging.for_output(prepared.out)
    plan = MergePlan.load(Path(prepared.plan_path))
    publisher = open_publisher(spec.push_to, **publish_options(spec))
    shipped: list[ShardResult] = []
    types = gguf_types(plan)
    first = gguf_filename(types[0])

    def ship(result: ShardResult) -> None:
        if result.filename == first:  # the Modelfile reads it: written before it is deleted
            _write_gguf_modelfile(staging, plan, first)
        try:
            publisher.put(staging.folder / result.filename, result.sha256, result.size)
        except MergeError as exc:
            raise _shipping_error(spec, exc, shipped, len(types), "GGUF files") from exc
        shipped.append(result)

    made = _make_gguf(prepared, spec, plan, staging, ship=ship)
    report = _gguf_report(plan, prepared.out, made)
    _write_gguf_card(staging, plan, report)
    _write_manifest(staging.folder, plan, prepared.fingerprint, report, made.written,
                    {MODELFILE, "README.md"})
    small = [staging.folder / name for name in sorted((MODELFILE, "README.md"))]
    try:
        published = publisher.finish(small, staging.folder / MANIFEST)
    except MergeError as exc:
        raise _shipping_error(spec, exc, shipped, len(types), "GGUF files") from exc
    staging.remove()
    report.out = spec.push_to
    return report, published


@dataclass(frozen=True)
class _GgufMade:
    """The GGUF files a merge asked for, in the order asked (written and checked in staging,
    or already shipped), and llama.cpp's score of each quantized one."""

    written: list[ShardResult]
    scores: list


def gguf_types(plan: MergePlan) -> list[str]:
    """The GGUF types a plan asks for (``gguf_type``), in order."""
    from mergeflow.engine import gguf_quant

    return gguf_quant.split_types(str(plan.options["gguf_type"]))


def _make_gguf(prepared: PreparedMerge, spec: MergeSpec, plan: MergePlan, staging: Staging, *,
               read_from: MergePlan | None = None,
               ship: Callable[[ShardResult], None] | None = None) -> _GgufMade:
    """Every GGUF type ``plan`` asks for, in staging: the type llama.cpp's converter writes
    (:func:`mergeflow.engine.gguf_quant.converted_type`) streamed from the merge, or from
    ``read_from`` (a plan reading the merged tensors back from finished shards), and checked;
    each type llama.cpp's quantizer makes quantized from it, checked and scored against it;
    the 16-bit file deleted unless it was asked for. ``ship``: given each finished, checked
    file asked for, which is then deleted (the 16-bit one once nothing more is made from it)."""
    from mergeflow.engine import gguf as gguf_export
    from mergeflow.engine import gguf_quant

    types = gguf_types(plan)
    converted = gguf_quant.converted_type(types, plan.dtype)
    tensors = read_from or plan
    folder = _converter_folder(plan, staging.state_dir / "gguf-source")
    streamed = gguf_export.write_gguf(tensors, open_merger(tensors, device=spec.device), staging,
                                      folder, converted, Path(plan.adapter).name,
                                      digest=converted in types)
    if spec.verify:
        _check_gguf(prepared, gguf_export.check_gguf(
            staging.folder / streamed.result.filename, streamed.tensors), plan)
    if ship is not None and converted in types:
        ship(streamed.result)
    results, scores = {converted: streamed.result}, []
    for gguf_type in types:
        if gguf_type in results:
            continue
        made = results[gguf_type] = _quantize_gguf(staging, streamed.result, gguf_type)
        if spec.verify:
            _check_gguf(prepared, gguf_export.check_gguf(
                staging.folder / made.filename, streamed.tensors, types_too=False), plan)
        if spec.gguf_check:
            scores += _score_gguf(staging, streamed.result, [made])
        if ship is not None:
            ship(made)
            (staging.folder / made.filename).unlink()
    if ship is not None or converted not in types:
        (staging.folder / streamed.result.filename).unlink()
    return _GgufMade([results[t] for t in types], scores)


def _staged_plan(plan: MergePlan, folder: Path) -> MergePlan:
    """``plan`` with every tensor read back as written from the finished checkpoint in
    ``folder`` (its shards and index), with no ops: a pass-through of the merged values."""
    shards = [ShardPlan(filename=shard.filename, tensors=[
        TensorPlan(name=t.name, dtype=t.dtype, shape=t.shape, source=BaseTensor(name=t.name))
        for t in shard.tensors]) for shard in plan.shards]
    return plan.model_copy(update={"base": str(folder), "original": None, "shards": shards})


def _scores(made: _GgufMade) -> dict[str, dict[str, float]]:
    """The report's ``gguf_scores``: each scored file's mean KL, top-1 agreement and tokens."""
    return {score.file: {"mean_kl": score.mean_kl, "top1": score.top1, "tokens": score.tokens}
            for score in made.scores}


def _gguf_report(plan: MergePlan, out: str, made: _GgufMade) -> MergeReport:
    """The report of ``save_method=gguf``: the files as its "shards", the types as its dtype."""
    report = _report(plan, read_adapter_config(Path(plan.adapter)), out, "merged")
    return report.model_copy(
        update={"dtype": ",".join(gguf_types(plan)), "shards": len(made.written),
                "total_size": sum(r.size for r in made.written),
                "notes": [*report.notes, *(score.words() for score in made.scores)],
                "gguf_files": {r.filename: r.size for r in made.written},
                "gguf_scores": _scores(made)})


def _write_gguf_modelfile(staging: Staging, plan: MergePlan, filename: str) -> None:
    """The Ollama Modelfile for the GGUF file ``filename`` (the first type asked), which must
    still be in staging (the Modelfile reads its metadata)."""
    write_modelfile(staging, filename, Path(str(plan.options["tokenizer"])))


def _write_gguf_card(staging: Staging, plan: MergePlan, report: MergeReport) -> None:
    """``save_method=gguf``'s model card."""
    adapter = Path(plan.adapter)
    base_name = read_adapter_config(adapter).get("base_model_name_or_path") or Path(plan.base).name
    (staging.folder / "README.md").write_text(model_card(base_name, adapter.name,
                                                         report.durable()))


def _converter_folder(plan: MergePlan, folder: Path) -> Path:
    """The folder llama.cpp's converter reads the merged model from, weights aside: its
    config.json (the plan's vocab and tie updates) and the tokenizer."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _write_model_config(plan, Path(plan.base), folder, keep_quantization=False)
    copy_tokenizer(Path(str(plan.options["tokenizer"])), folder)
    return folder


def _check_convertible(plan: MergePlan, base_dir: Path) -> None:
    """Refuse, before anything is written, what llama.cpp's converter will not convert (a dry
    run on the plan's shapes, in a scratch folder)."""
    from mergeflow.engine import gguf as gguf_export
    from mergeflow.engine import gguf_quant

    types = gguf_quant.split_types(str(plan.options["gguf_type"]))
    with tempfile.TemporaryDirectory(prefix="mergeflow-gguf-") as scratch:
        folder = _converter_folder(plan, Path(scratch) / "model")
        gguf_export.check_convertible(folder, plan, gguf_quant.converted_type(types, plan.dtype))


def _check_gguf(prepared: PreparedMerge, problems: list[str], plan: MergePlan) -> None:
    check_verified(prepared, VerifyReport(ok=not problems, files=1, tensors=plan.tensor_count,
                                          problems=problems))


def _score_gguf(staging: Staging, reference: ShardResult, quantized: list[ShardResult]) -> list:
    """llama.cpp's score of each quantized file against the 16-bit one it was made from
    (:mod:`mergeflow.engine.gguf_score`); none when no file was quantized from a 16-bit one."""
    if not quantized:
        return []
    from mergeflow.engine.gguf_score import score_files

    return score_files(staging.folder / reference.filename,
                       [staging.folder / r.filename for r in quantized], resources.usable_cpus())


def _quantize_gguf(staging: Staging, streamed: ShardResult, gguf_type: str) -> ShardResult:
    """The streamed 16-bit GGUF quantized by llama.cpp into ``model-<gguf_type>.gguf`` (under a
    partial name, fsynced, renamed), on every usable core."""
    from mergeflow.engine import gguf as gguf_export
    from mergeflow.engine import gguf_quant

    filename = gguf_export.gguf_filename(gguf_type)
    partial, final = staging.partial(filename), staging.folder / filename
    gguf_quant.quantize(staging.folder / streamed.filename, partial, gguf_type,
                        resources.usable_cpus())
    faults.checkpoint("gguf-before-rename")
    durable_rename(partial, final)
    return ShardResult(filename=filename, size=final.stat().st_size, sha256=sha256_file(final))


def up_to_date_report(prepared: PreparedMerge) -> MergeReport:
    """The report of a merge that was already finished in ``out``."""
    manifest = read_manifest(Path(prepared.out)) or {}
    return MergeReport(out=prepared.out, status="up-to-date", **manifest.get("report", {}))


def merge_low_disk(prepared: PreparedMerge, spec: MergeSpec,
                   progress: Progress | None = None) -> tuple[MergeReport, PublishResult]:
    """Merge straight to ``spec.push_to`` keeping one shard on local disk at a time.

    Each shard is written, verified, published and deleted before the next is written; then the
    small files and - last - the manifest are published, and the staging folder is removed.
    A rerun re-creates (byte-identical) shards that are gone locally; the publisher skips the
    ones already at the destination.

    Raises:
        VerificationError: a shard failed its checks (it is not published).
        SinkError, TransientError: from the destination, before any shard was shipped.
        UploadError, TransientUploadError: the destination failed after some shards were
            shipped (the message says which are there, and that the manifest is not).
    """
    plan = MergePlan.load(Path(prepared.plan_path))
    staging = Path(prepared.staging)
    publisher = open_publisher(spec.push_to, **publish_options(spec))
    source = open_merger(plan, device=spec.device)
    results = []
    for index, shard in enumerate(plan.shards):
        result = run_shard(prepared.plan_path, index, spec.device, source, progress)
        if spec.verify:
            check_verified(prepared, verify_shard(staging, shard, source))
        try:
            publisher.put(staging / shard.filename, result.sha256, result.size)
        except MergeError as exc:
            raise _shipping_error(spec, exc, results, len(plan.shards)) from exc
        (staging / shard.filename).unlink()
        results.append(result)
    report = finalize(prepared, results)
    small = sorted(p for p in staging.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name != MANIFEST)
    try:
        published = publisher.finish(small, staging / MANIFEST)
    except MergeError as exc:
        raise _shipping_error(spec, exc, results, len(plan.shards)) from exc
    Staging.for_output(prepared.out).remove()
    report.out = spec.push_to
    return report, published


def _shipping_error(spec: MergeSpec, exc: MergeError, shipped: list[ShardResult],
                    total: int, what: str = "shards") -> MergeError:
    """A low-disk publish that failed: as it is when nothing was shipped yet, else an
    UploadError saying which ``what`` (shards, GGUF files) are at the destination and that its
    manifest is not."""
    if not shipped:
        return exc
    kind = TransientUploadError if isinstance(exc, TransientError) else UploadError
    names = ", ".join(r.filename for r in shipped)
    return kind(f"publishing to {spec.push_to} failed after {len(shipped)} of {total} {what} "
                f"were shipped ({names}); the rest and the manifest are not there, so "
                f"{spec.push_to} is not a finished model and nothing is published locally: {exc}. "
                "Rerun the same command to go on (shards already there are skipped)")


def check_verified(prepared: PreparedMerge, report: VerifyReport) -> None:
    """Raise when verification failed; the staging folder is then left unpublished.

    Raises:
        VerificationError: with the first problems found.
    """
    if not report.ok:
        raise VerificationError(f"{prepared.staging}: verification failed, output not "
                                "published: " + "; ".join(report.problems[:5]))


@dataclass(frozen=True)
class ShardState:
    """One shard of a prepared merge, as an orchestrator schedules it."""

    index: int
    filename: str
    holds_vocab: bool  # the group with the embedding and head (resized, untied)
    finished: ShardResult | None  # written and checksum-verified by an earlier run


def shard_states(prepared: PreparedMerge) -> list[ShardState]:
    """Every shard of a prepared merge, in order, with what an earlier run already finished."""
    plan = MergePlan.load(Path(prepared.plan_path))
    staging = Staging.from_folder(prepared.staging)
    return [ShardState(i, s.filename, i in plan.vocab_groups, finished_shard(staging, s.filename))
            for i, s in enumerate(plan.shards)]


def resolved_base(prepared: PreparedMerge) -> str | None:
    """The base folder the merge reads (resolved from ``spec.base`` or the adapter's config):
    from the plan, or for a finished output from its manifest."""
    plan_path = Path(prepared.plan_path)
    if plan_path.is_file():
        return MergePlan.load(plan_path).base
    manifest = read_manifest(Path(prepared.out)) or {}
    return (manifest.get("inputs") or {}).get("base")
