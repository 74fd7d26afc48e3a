"""The in-process route: ``mergeflow.merge`` and a local ``mergeflow merge`` run the pipeline's
steps here, in their one order (:mod:`mergeflow.pipeline.order`), without Prefect."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from mergeflow.engine.shards import Progress, open_merger
from mergeflow.errors import OptionsError
from mergeflow.pipeline import resources, steps
from mergeflow.pipeline.order import Carried, Timings, run_steps
from mergeflow.pipeline.results import MergeReport, PreparedMerge, ShardResult
from mergeflow.plan import MergePlan, TensorPlan
from mergeflow.spec import OPTION_COMBINATION, MergeSpec
from mergeflow.storage.lock import output_lock


def check_location(name: str, value: object, optional: bool = False) -> None:
    """Refuse a ``merge`` argument that is not a folder path or an ``hf://`` / ``s3://``
    reference (a ``str`` or ``os.PathLike``; None too when ``optional``).

    Raises:
        TypeError: naming the argument and what it got; for a model object (a live
            ``PeftModel`` or ``transformers`` model), pointing at the live route.
    """
    if isinstance(value, (str, os.PathLike)) or (optional and value is None):
        return
    kind = type(value).__name__
    what = f"`{name}` must be a folder path, hf://org/name or s3://bucket/prefix (got {kind})"
    if hasattr(value, "save_pretrained") or hasattr(value, "state_dict"):
        raise TypeError(f"mergeflow.merge: {what}. To merge a model in memory (a trained "
                        "PeftModel), call mergeflow.save_pretrained_merged(model, out) or "
                        "model.save_pretrained_merged(out) after mergeflow.patch(model): the "
                        "live route reads the adapter from the model itself")
    raise TypeError(f"mergeflow.merge: {what}")


def merge(base: str | Path | None, adapter: str | Path, out: str | Path, *,
          progress: Callable[[TensorPlan], None] | None = None, **options) -> MergeReport:
    """Merge a LoRA adapter into its base and write a SafeTensors checkpoint to ``out``.

    Args:
        base: base model folder.
        adapter: PEFT adapter folder.
        out: output folder (created; it appears only when complete).
        progress: called after each output tensor is written.
        **options: any other :class:`~mergeflow.spec.MergeSpec` field (``dtype``,
            ``max_shard_size``, ``tokenizer``, ``overwrite``, ``device``, ``save_method``
            ("merged_16bit" | "merged_4bit" | "lora" | "gguf" | "merged_16bit,gguf"),
            ``gguf_type``, ``merge_onto`` ("dequantized" |
            "original"), ``original_base``, ...).

    Returns:
        A :class:`MergeReport`; ``status`` is "up-to-date" when ``out`` already held this merge.

    Raises:
        TypeError: ``base``, ``adapter`` or ``out`` is not a path or a reference (e.g. a live
            ``PeftModel``: that one goes to :func:`mergeflow.save_pretrained_merged`).
        ValidationError: an option's value is invalid (a ``ValueError``).
        OptionsError: options that cannot go together (an InputError and a ``ValueError``).
        InputError: bad inputs or output location, found while planning (nothing is written).
        DiskSpaceError: the disk filled up mid-merge (staging is kept; a rerun resumes).
        UploadError: ``push_to`` failed after ``out`` was published (the message says so).
        MergeError: any other failure (the output folder is left untouched).
    """
    for name, value in (("base", base), ("adapter", adapter), ("out", out)):
        check_location(name, value, optional=name == "base")
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    try:
        spec = MergeSpec(base=str(base) if base is not None else None, adapter=str(adapter),
                         out=str(out), **options)
    except ValidationError as exc:
        combinations = [e["msg"] for e in exc.errors() if e["type"] == OPTION_COMBINATION]
        if combinations and len(combinations) == len(exc.errors()):
            raise OptionsError("; ".join(combinations)) from None
        raise
    with output_lock(spec.out):  # one writer per output
        timings = Timings()
        with timings("load"):
            prepared = steps.prepare(spec, ahead=True)  # its shards are written here next
        return run_local(prepared, spec, progress, timings=timings)


def run_local(prepared: PreparedMerge, spec: MergeSpec,
              progress: Progress | None = None,
              on_phase: Callable[[str], None] | None = None,
              timings: Timings | None = None) -> MergeReport:
    """Run a prepared merge in this process, without Prefect: the steps
    :func:`mergeflow.pipeline.order.steps_for` names, in its order (write every shard not
    already written, finalize, verify, publish and, with ``spec.push_to``, upload).
    ``mergeflow.merge`` and a local ``mergeflow merge`` both run this; the Prefect flow runs the
    same steps as tasks.

    ``progress`` is called after each output tensor is written (from the worker threads when
    several shards are written at once); ``on_phase`` with "verify" and "publish" as those
    steps begin (the CLI shows them). The report's ``timings`` hold each step's wall time,
    after those already in ``timings`` (the planning's, as ``load``).

    Raises:
        InputError, MergeError: as :func:`merge`.
    """
    timings = timings if timings is not None else Timings()
    carried = run_steps(prepared, spec, LocalSteps(progress, on_phase), around=timings.step)
    assert carried.report is not None  # every route's first step makes the report
    return carried.report.model_copy(update={"timings": dict(timings)})


class LocalSteps:
    """Each pipeline step called in place, in this process."""

    def __init__(self, progress: Progress | None = None,
                 on_phase: Callable[[str], None] | None = None) -> None:
        self.progress = progress
        self.phase = on_phase or (lambda name: None)

    def up_to_date(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        carried.report = steps.up_to_date_report(prepared)

    def merge_low_disk(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        carried.report = steps.merge_low_disk(prepared, spec, self.progress)[0]

    def gguf_low_disk(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        carried.report = steps.gguf_low_disk(prepared, spec)[0]

    def write_gguf(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        carried.report = steps.write_gguf_output(prepared, spec)

    def write_shards(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        carried.results = run_shards(prepared, spec, self.progress)

    def finalize(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        carried.report = steps.finalize(prepared, carried.results)

    def verify(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        self.phase("verify")
        carried.verification = steps.verify(prepared, spec.device, carried.results)
        steps.check_verified(prepared, carried.verification)

    def convert_gguf(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        assert carried.report is not None  # finalize's
        self.phase("gguf")
        carried.report = steps.convert_gguf_output(prepared, spec, carried.results,
                                                   carried.report)

    def publish(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        if spec.save_method != "gguf":  # a GGUF file is one rename; no phase line for it
            self.phase("publish")
        steps.publish_output(prepared)

    def upload(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        steps.upload_published(spec)


def run_shards(prepared: PreparedMerge, spec: MergeSpec,
               progress: Progress | None = None) -> list[ShardResult]:
    """Write every shard of a prepared merge (finished ones are kept, see :func:`run_shard`),
    as many at once as :func:`mergeflow.pipeline.resources.for_spec` decides: in order with one tensor
    source, or on a thread pool (each shard opening its own source, as the flow's tasks do,
    and torch's threads divided between them). The shards planning wrote ahead
    (:attr:`PreparedMerge.written_ahead`) are taken as they are. The first failure stops the
    shards not yet started.
    """
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    plan = MergePlan.load(Path(prepared.plan_path))
    ahead = _written_ahead(prepared, plan, progress)
    todo = [i for i in range(len(plan.shards)) if i not in ahead]
    decided = resources.running(resources.for_spec(spec), max(1, len(todo)))
    resources.apply_threads(decided)  # leave each worker's writer thread a core
    written: dict[int, ShardResult] = dict(ahead)
    if decided.workers <= 1:
        source = open_merger(plan, device=spec.device) if todo else None
        for i in todo:
            written[i] = steps.run_shard(prepared.plan_path, i, spec.device, source, progress)
        return [written[i] for i in range(len(plan.shards))]
    with ThreadPoolExecutor(max_workers=decided.workers,
                            thread_name_prefix="mergeflow-shard") as pool:
        futures = {i: pool.submit(steps.run_shard, prepared.plan_path, i, spec.device, None,
                                  progress) for i in todo}
        done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
        failed = [f for f in futures.values() if f in done and f.exception() is not None]
        if failed:
            for future in futures.values():
                future.cancel()
            raise failed[0].exception()
    written.update((i, future.result()) for i, future in futures.items())
    return [written[i] for i in range(len(plan.shards))]


def _written_ahead(prepared: PreparedMerge, plan: MergePlan,
                   progress: Progress | None) -> dict[int, ShardResult]:
    """The shards of ``plan`` that planning wrote ahead, by index (their tensors reported to
    ``progress``, as a resumed shard's are)."""
    by_name = {result.filename: result for result in prepared.written_ahead}
    found = {i: by_name[s.filename] for i, s in enumerate(plan.shards) if s.filename in by_name}
    if progress is not None:
        for i in found:
            for tensor in plan.shards[i].tensors:
                progress(tensor)
    return found
