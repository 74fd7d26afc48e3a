"""Several adapters of one base, one sweep over the base: :func:`merge_many`.

Every output is planned first, so every bad input shows up in one run and nothing is written
when any is refused. Then the shards are written in one sweep over the base: shard ``k`` of
every output before shard ``k + 1`` of any, several outputs side by side
(:func:`mergeflow.pipeline.resources.automatic_workers`), so each base shard is read from the
disk once and its blocks are found in the page cache by the other outputs (the workers' memory
stays within the budget; the cache is the kernel's, reclaimable). Then each output is finished
on its own (finalize, verify, publish, upload), as many at once as the sweep merged, exactly as
a single merge of that adapter finishes it: its write steps find their shards done, as a resumed
merge does, so every output is the folder a single merge writes, byte for byte. One output
failing does not stop or unpublish the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from mergeflow.engine.shards import Progress
from mergeflow.errors import InputError, MergeError
from mergeflow.pipeline import resources, steps
from mergeflow.pipeline.local import LocalSteps
from mergeflow.pipeline.order import Carried, run_steps
from mergeflow.pipeline.results import MergeReport, PreparedMerge, ShardResult
from mergeflow.spec import MergeSpec
from mergeflow.storage.lock import output_lock
from mergeflow.storage.staging import Staging


class PartialMergeError(MergeError):
    """Some outputs of :func:`merge_many` failed; ``reports`` holds the finished ones and
    ``failed`` each failed output's one-line error."""

    def __init__(self, reports: dict[str, MergeReport], failed: dict[str, str]) -> None:
        self.reports, self.failed = reports, failed
        done = ", ".join(reports) or "none"
        errors = "; ".join(f"{out}: {error}" for out, error in failed.items())
        super().__init__(f"{len(failed)} of {len(reports) + len(failed)} outputs failed "
                         f"({errors}); finished: {done}")


def output_folders(out: str | Path, adapters: list[str], names: list[str] | None = None
                   ) -> dict[str, str]:
    """``out/<name>`` per adapter, named after the adapter folder (or ``names``, in order).

    Raises:
        InputError: two outputs would share a name, or ``names`` does not name every adapter.
    """
    if names is not None and len(names) != len(adapters):
        raise InputError(f"{len(names)} output names for {len(adapters)} adapters; give one "
                         "`out_name` per adapter, in order")
    chosen = names or [_folder_name(adapter) for adapter in adapters]
    seen: dict[str, str] = {}
    for name, adapter in zip(chosen, adapters, strict=True):
        if name in seen:
            raise InputError(f"{seen[name]} and {adapter} would both be written to "
                             f"{Path(out) / name}; name the outputs with `out_name`")
        seen[name] = adapter
    return {str(Path(out) / name): adapter for name, adapter in zip(chosen, adapters, strict=True)}


def _folder_name(adapter: str) -> str:
    """The adapter folder's name: an ``hf://org/name@revision`` reference loses its revision; a
    local path or ``s3://`` prefix keeps every character (``run@v2`` is a folder name)."""
    ref = adapter.rstrip("/")
    if ref.startswith("hf://"):
        ref = ref.split("@")[0]
    return Path(ref).name


def _prepare_all(specs: list[MergeSpec]) -> dict[str, PreparedMerge]:
    """Plan every output; refuse them all (removing what planning staged) if any is refused."""
    prepared, refusals = {}, []
    for spec in specs:
        try:
            prepared[spec.out] = steps.prepare(spec)
        except InputError as exc:
            refusals.append(f"{spec.adapter}: {exc}")
    if refusals:
        for plan in prepared.values():
            if not plan.up_to_date:
                Staging.for_output(plan.out).remove()
        raise InputError(f"{len(refusals)} of {len(specs)} adapters refused, nothing written: "
                         + " | ".join(refusals))
    return prepared


def _swept(specs: list[MergeSpec], prepared: dict[str, PreparedMerge]) -> list[MergeSpec]:
    """The outputs whose shards the sweep writes (not up to date, not GGUF-only, not low-disk,
    which write and ship their own files)."""
    return [s for s in specs if not prepared[s.out].up_to_date
            and s.save_method != "gguf" and not s.low_disk]


def _sweep(sweeping: list[MergeSpec], prepared: dict[str, PreparedMerge],
           progress: Progress | None, workers: int, step: Callable[[], None]
           ) -> tuple[dict[str, list[ShardResult]], dict[str, str]]:
    """Write shard ``k`` of every output before shard ``k + 1`` of any, the outputs' shards
    ``k`` side by side on ``workers`` threads (they read the same base blocks at about the same
    time), calling ``step`` on this thread as each is done; returns each output's shard
    results, and the outputs that failed with their errors (their other shards are not
    written)."""
    failed: dict[str, str] = {}
    written: dict[str, list[ShardResult]] = {spec.out: [] for spec in sweeping}
    if not sweeping:
        return written, failed
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergeflow-sweep") as pool:
        for index in range(max(prepared[s.out].shard_count for s in sweeping)):
            jobs = {spec.out: pool.submit(steps.run_shard, prepared[spec.out].plan_path, index,
                                          spec.device, None, progress)
                    for spec in sweeping
                    if spec.out not in failed and index < prepared[spec.out].shard_count}
            for out, job in jobs.items():
                try:
                    written[out].append(job.result())
                except MergeError as exc:
                    failed[out] = str(exc)
                step()
    return written, failed


class _SweptSteps(LocalSteps):
    """The local steps of one output whose shards the sweep wrote: its write step hands on
    the sweep's results (with their sha256) instead of reading each shard again to confirm
    it, as a resume would."""

    def __init__(self, results: list[ShardResult]) -> None:
        super().__init__()
        self.results = results

    def write_shards(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None:
        if len(self.results) == prepared.shard_count:
            carried.results = list(self.results)
        else:  # not swept (GGUF, low disk) or incomplete: the ordinary step
            super().write_shards(prepared, spec, carried)


#: Called once per finished output with its spec, plan and what its steps carried (report,
#: shard results, verification): what a caller such as the Prefect flow reports per output.
OnFinished = Callable[[MergeSpec, PreparedMerge, Carried], None]

#: Called with the fraction of the batch done (swept shards and finished outputs, 0 to 1).
OnProgress = Callable[[float], None]


class _Steps:
    """The batch's progress: one step per swept shard and per output finished."""

    def __init__(self, total: int, report: OnProgress | None) -> None:
        self.total, self.done, self.report = max(1, total), 0, report

    def __call__(self) -> None:
        self.done += 1
        if self.report is not None:
            self.report(min(1.0, self.done / self.total))


def merge_many(base: str | Path | None, outputs: Mapping[str | Path, str | Path], *,
               progress: Progress | None = None, on_finished: OnFinished | None = None,
               on_progress: OnProgress | None = None, **options) -> dict[str, MergeReport]:
    """Merge several adapters of one base, each into its own output, in one sweep over the base
    (see the module's text). ``outputs``: output folder -> adapter; ``**options``: any other
    :class:`~mergeflow.spec.MergeSpec` field, the same for every output, except ``push_to``: a
    template in which ``{name}`` becomes each output folder's name. ``on_finished``: called as
    each output is finished (see :data:`OnFinished`). ``on_progress``: called with the
    fraction done as each shard is swept and each output finished (on this thread, as
    ``on_finished``).

    Returns:
        One report per output, by output folder.

    Raises:
        InputError: any adapter or output refused while planning (all are named; nothing is
            written), or one ``push_to`` without ``{name}`` for several outputs.
        PartialMergeError: some outputs failed after planning; the others are finished and
            published (the error holds their reports).
    """
    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    push_to = options.pop("push_to", None)
    if push_to and len(outputs) > 1 and "{name}" not in push_to:
        raise InputError(f"push_to={push_to}: with several adapters, every output would be "
                         "published there; put {name} where each output's name goes "
                         "(e.g. s3://bucket/merged/{name})")
    specs = [MergeSpec(base=str(base) if base is not None else None, adapter=str(adapter),
                       out=str(out), push_to=push_to.replace("{name}", Path(out).name)
                       if push_to else None, **options) for out, adapter in outputs.items()]
    with contextlib.ExitStack() as held:
        for spec in specs:
            held.enter_context(output_lock(spec.out))  # one writer per output
        prepared = _prepare_all(specs)
        sweeping = _swept(specs, prepared)
        decided = resources.for_spec(specs[0], outputs=max(1, len(sweeping)))
        resources.apply_threads(decided)
        step = _Steps(sum(prepared[s.out].shard_count for s in sweeping) + len(specs),
                      on_progress)
        written, failed = _sweep(sweeping, prepared, progress, decided.workers, step)
        # outputs that merge on their own (GGUF, low disk) are finished one at a time
        at_once = decided.workers if len(sweeping) == len(specs) else 1
        reports = _finish(specs, prepared, written, failed, at_once, on_finished, step)
    if failed:
        raise PartialMergeError(reports, failed)
    return reports


def _finish(specs: list[MergeSpec], prepared: dict[str, PreparedMerge],
            written: dict[str, list[ShardResult]], failed: dict[str, str], at_once: int,
            on_finished: OnFinished | None, step: Callable[[], None]) -> dict[str, MergeReport]:
    """Run each output's steps (what the sweep left: finalize, verify, publish, upload),
    ``at_once`` outputs at a time; ``on_finished`` and ``step`` are called on this thread as
    each finishes, and each failure is added to ``failed``. Returns the finished outputs'
    reports, in order."""
    todo = [spec for spec in specs if spec.out not in failed]
    reports: dict[str, MergeReport] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(at_once, len(todo))),
                            thread_name_prefix="mergeflow-finish") as pool:
        jobs = {pool.submit(run_steps, prepared[spec.out], spec,
                            _SweptSteps(written.get(spec.out, []))): spec for spec in todo}
        for job in as_completed(jobs):
            spec = jobs[job]
            step()
            try:
                carried = job.result()
            except MergeError as exc:
                failed[spec.out] = str(exc)
                continue
            assert carried.report is not None  # every route's first step makes it
            reports[spec.out] = carried.report
            if on_finished is not None:
                on_finished(spec, prepared[spec.out], carried)
    return {spec.out: reports[spec.out] for spec in specs if spec.out in reports}
