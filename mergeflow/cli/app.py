"""The ``mergeflow`` command.

Exit codes follow the phase: 0 success; 2 bad input refused while planning, before anything
is written (a one-line message naming the file or key and the fix); 1 any failure once the merge
runs (a full disk mid-merge, a destination failing after ``--out`` was published: the message
says what was published and what was not); 130 interrupted by Ctrl-C (SIGINT) or SIGTERM, either
signal: one line on stderr names the staging folder, which is kept, and says that rerunning the
same command resumes (:class:`_StopOnSignal`). See :mod:`mergeflow.errors`.

Core messages name options by their MergeSpec fields in backticks (`` `overwrite=True` ``);
everything this module prints goes through :func:`cli_words`, which shows them as flags.

The ``merge`` options are :class:`~mergeflow.spec.MergeSpec`'s fields: their help and defaults
come from the spec (``tests/test_cli.py`` proves that every field has its flag).

``mergeflow merge`` runs in-process (``mergeflow.pipeline.run_local``) unless the run should be a
Prefect flow run: with ``--prefect``, ``PREFECT_API_URL`` in the environment, ``--dask-address``
or ``--push-to``. The core (torch, ...) and Prefect are imported only inside the commands, so
``--help`` starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console

from mergeflow.errors import InputError, MergeError
from mergeflow.spec import MergeSpec, format_size

if TYPE_CHECKING:
    from mergeflow.pipeline.results import MergeReport, PreparedMerge

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge LoRA adapters into base models and publish SafeTensors checkpoints.")
err = Console(stderr=True)
out = Console()

@app.callback()
def main() -> None:
    """Mergeflow: streaming LoRA merges."""


def flow_reason(spec: MergeSpec, prefect: bool = False) -> str | None:
    """Why this merge runs as a Prefect flow run; None: it runs in-process."""
    if prefect:
        return "--prefect"
    if os.environ.get("PREFECT_API_URL"):
        return "PREFECT_API_URL is set"
    if spec.dask_address:
        return "--dask-address"
    if spec.push_to:
        return "--push-to"
    return None


#: The exit code of a merge stopped by Ctrl-C (SIGINT) or by SIGTERM: 128 + SIGINT, what a shell
#: reports for Ctrl-C. SIGTERM exits with the same code (not 143), so a caller tests for one code
#: meaning "interrupted; staging is kept and a rerun resumes".
INTERRUPTED = 130

#: Called with the interrupt line when a signal stops the merge (the progress display, the
#: Prefect run started from here), before the line is printed and the process exits.
_on_interrupt: list[Callable[[str], None]] = []

_FLAG_WORD = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def cli_words(text: str) -> str:
    """A core message with its option names (MergeSpec fields in backticks: `` `max_shard_size` ``,
    `` `merge_onto=original` ``, `` `overwrite=True` ``, `` `tokenizer=PATH` ``) as the flags
    of ``mergeflow merge`` (``--max-shard-size``, ``--merge-onto original``, ``--overwrite``,
    ``--tokenizer PATH``). Backticked words that are not fields are left as they are."""
    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if name not in MergeSpec.model_fields:
            return match.group(0)
        option = "--" + name.replace("_", "-")
        if value is None or value == "True":
            return option
        if value == "False":
            return "--no-verify" if name == "verify" else f"no {option}"
        return f"{option} {value}"
    return _FLAG_WORD.sub(flag, text)


def interrupted_line(out: str | Path) -> str:
    """The one line printed when SIGINT or SIGTERM stops a merge into ``out``: what is kept and
    that rerunning the same command goes on from there."""
    from mergeflow.storage.staging import Staging

    staging = Staging.for_output(out)
    if staging.folder.is_dir():
        return f"interrupted: staging kept at {staging.folder}; rerun the same command to resume"
    if staging.published():
        return (f"interrupted: {staging.out} holds a finished merge; rerun the same command to "
                "finish what was left (nothing is merged again)")
    return "interrupted before anything was staged; rerun the same command to start the merge"


class _StopOnSignal:
    """SIGINT and SIGTERM while a merge runs: run the :data:`_on_interrupt` hooks, print
    :func:`interrupted_line` on stderr and exit :data:`INTERRUPTED` at once (``os._exit``: worker
    threads and the writer stop where they are; staging survives that like a power cut, see
    docs/reliability.md, and a rerun resumes). No traceback: the work runs off the main thread
    (:func:`_in_thread`), so only this handler sees the signal."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, out: str | Path) -> None:
        self.out = out
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopOnSignal:
        for signum in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[signum] = signal.signal(signum, self._stop)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _stop(self, signum: int, frame) -> None:
        for other in self.SIGNALS:  # a second Ctrl-C while stopping changes nothing
            signal.signal(other, signal.SIG_IGN)
        line = interrupted_line(self.out)
        for hook in reversed(_on_interrupt):
            with contextlib.suppress(Exception):
                hook(line)
        err.print(line, highlight=False, soft_wrap=True, markup=False)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(INTERRUPTED)


def _in_thread(work: Callable[..., T], *args, **kwargs) -> T:
    """``work(*args, **kwargs)`` on a thread of its own while this thread waits, returning its
    result or raising its exception. Run from the main thread, signals then reach
    :class:`_StopOnSignal` at once, and Prefect's flow engine, off the main thread, installs no
    SIGTERM handler of its own."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = work(*args, **kwargs)
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="mergeflow-run", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _run(spec: MergeSpec, prefect: bool = False) -> tuple[MergeReport, str]:
    """Plan (failing fast on bad input), then run the merge - in-process, or as the Prefect flow
    (see :func:`flow_reason`) - with a progress bar. Returns the report and the line saying
    which path ran."""
    return _execute(spec, _plan(spec), prefect)


def _plan(spec: MergeSpec) -> PreparedMerge:
    """The planning phase: every refusal of bad input happens here, before any output is
    written (an InputError from here exits 2)."""
    from mergeflow import pipeline

    pipeline.for_spec(spec)  # sizes and the memory bound are checked before anything runs
    return pipeline.prepare(spec)


def _execute(spec: MergeSpec, prepared: PreparedMerge,
             prefect: bool = False) -> tuple[MergeReport, str]:
    """The run phase of a planned merge (any failure from here exits 1), on a thread of its
    own (:func:`_in_thread`)."""
    from mergeflow import pipeline

    reason = flow_reason(spec, prefect)
    if reason is None or (prepared.up_to_date and not spec.push_to):
        with _StagingProgress(prepared, enabled=not prepared.up_to_date) as progress:
            report = _in_thread(pipeline.run_local, prepared, spec, on_phase=progress.phase)
            progress.finish()
        if reason is not None:  # nothing to merge, so no flow run was started
            return report, f"ran in-process (already up to date; no flow run started although {reason})"
        return report, "ran in-process"
    return _run_flow(spec, prepared, reason)


def _run_flow(spec: MergeSpec, prepared: PreparedMerge, reason: str) -> tuple[MergeReport, str]:
    """Run the ``merge-adapter`` flow on the merge planned already (it is not planned twice);
    an interrupt marks its run crashed and stops Prefect's temporary server
    (:func:`flows.merge.abandon_cli_runs`)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL, Prefect starts a temporary local server; give it time on a busy box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.merge import abandon_cli_runs, run_from_cli

    _on_interrupt.insert(0, abandon_cli_runs)  # after the progress display is stopped
    try:
        with _StagingProgress(prepared, enabled=not prepared.up_to_date) as progress:
            report, name = _in_thread(run_from_cli, spec, prepared)  # raises the flow's error
            progress.finish(verified=_verify_step_runs(spec))
    finally:
        _on_interrupt.remove(abandon_cli_runs)
    return report, f"ran as Prefect flow run merge-adapter/{name} ({reason})"


def _verify_step_runs(spec: MergeSpec) -> bool:
    """Whether a run of ``spec`` has a verify step of its own between finalize and publish
    (:func:`mergeflow.pipeline.run_local` and the flow alike): a low-disk merge verifies each shard
    as it goes, and a GGUF output is published without one."""
    return spec.verify and not spec.low_disk and spec.save_method != "gguf"


def format_rate(bytes_per_second: float | None) -> str:
    """A write rate for people: ``85.00 MB/s``, ``1.20 GB/s``; ``-`` before anything moved."""
    from mergeflow.spec import format_size

    if not bytes_per_second or bytes_per_second <= 0:
        return "- B/s"
    return f"{format_size(bytes_per_second)}/s"


def format_eta(seconds: float | None) -> str:
    """Time left for people: ``ETA 0:07``, ``ETA 1:02:03``; ``ETA -`` while unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf") or seconds < 0:
        return "ETA -"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}:{minutes:02d}:{secs:02d}" if hours else f"ETA {minutes}:{secs:02d}"


def format_pair(done: int, total: int) -> str:
    """Bytes done of a total in the total's unit: ``0.45/1.20 GB``, ``12.0/35.0 KB``."""
    from mergeflow.spec import format_size

    figure, unit = format_size(total).split(" ")
    if unit == "B":
        return f"{done}/{total} B"
    scale = total / float(figure)
    return f"{done / scale:.2f}/{figure} {unit}"


def progress_detail(tensors_done: int, tensors_total: int, bytes_done: int, bytes_total: int,
                    seconds: float, bytes_this_run: int) -> str:
    """The progress line's figures: tensors and bytes done of the total, the rate this run
    writes at (resumed bytes left out) and the time left at that rate, e.g.
    ``12/40 tensors, 0.45/1.20 GB, 85.00 MB/s, ETA 0:09``."""
    rate = bytes_this_run / seconds if seconds > 0 and bytes_this_run > 0 else None
    eta = (bytes_total - bytes_done) / rate if rate else None
    return (f"{tensors_done}/{tensors_total} tensors, {format_pair(bytes_done, bytes_total)}, "
            f"{format_rate(rate)}, {format_eta(eta)}")


def finished_line(tensors: int, bytes_total: int, seconds: float, bytes_this_run: int) -> str:
    """The line left on stderr when the writing is done, e.g. ``wrote 40/40 tensors, 1.20 GB
    in 3.1 s (387.10 MB/s)`` (the rate of the bytes this run wrote: resumed ones left out)."""
    from mergeflow.spec import format_size

    rate = format_rate(bytes_this_run / seconds if seconds > 0 else None)
    return f"wrote {tensors}/{tensors} tensors, {format_size(bytes_total)} in {seconds:.1f} s ({rate})"


def _tensor_ends(plan_path: str) -> dict[str, list[int]]:
    """Each shard file's planned tensors as the data offsets where each one ends."""
    from itertools import accumulate

    from mergeflow.plan import MergePlan

    plan = MergePlan.load(Path(plan_path))
    return {s.filename: list(accumulate(t.nbytes for t in s.tensors)) for s in plan.shards}


def _tensors_in(path: Path, ends: list[int]) -> int:
    """How many of a shard's tensors a file being written holds so far (its header comes first:
    8 bytes of length, then the JSON)."""
    try:
        with path.open("rb") as file:
            header = int.from_bytes(file.read(8), "little")
            written = path.stat().st_size - 8 - header
    except OSError:
        return 0
    return sum(end <= written for end in ends)


class _StagingProgress:
    """The progress display, fed by watching the staging folder grow, so it works the same
    whatever runs the groups (threads, processes, a Dask cluster sharing the disk): tensors and
    bytes done, rate and ETA on a transient bar; the verify phase and the finished writing as
    lines on stderr."""

    def __init__(self, prepared: PreparedMerge, interval: float = 0.25,
                 enabled: bool = True) -> None:
        from mergeflow.storage.staging import Staging

        self.staging = Staging.for_output(prepared.out)
        self.out = prepared.out
        self.total = prepared.total_size
        self.tensors = prepared.tensor_count
        self.interval = interval
        self.enabled = enabled
        self._ends = _tensor_ends(prepared.plan_path) \
            if enabled and Path(prepared.plan_path).is_file() else {}
        self._recorded: dict[str, int] = {}
        self._phase = "merging"
        self._said_written = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._start = time.monotonic()
        self._start_bytes = 0

    def _written(self) -> tuple[int, int]:
        """Bytes and tensors in the staging folder so far."""
        size = 0
        for path in self.staging.progress_files():
            with contextlib.suppress(OSError):
                size += path.stat().st_size
        tensors = 0
        for filename, ends in self._ends.items():
            if (self.staging.folder / filename).is_file():
                tensors += len(ends)
            elif self.staging.done_record(filename).is_file():  # shipped and deleted (low_disk)
                tensors += len(ends)
                size += self._recorded_size(filename)
            else:
                tensors += _tensors_in(self.staging.partial(filename), ends)
        return min(size, self.total), tensors

    def _recorded_size(self, filename: str) -> int:
        """The size a shard's done record gives (0 if unreadable), read once."""
        if filename not in self._recorded:
            try:
                record = json.loads(self.staging.done_record(filename).read_text())
                self._recorded[filename] = int(record["size"])
            except (OSError, ValueError, KeyError, TypeError):
                return 0
        return self._recorded[filename]

    def phase(self, name: str) -> None:
        """The merge entered step ``name`` ("verify", "publish"; called from the thread that
        runs the merge): the writing is over, so say what was written; a verify phase gets
        its own line on stderr."""
        if not self.enabled:
            return
        self._say_written()
        if name != "verify":
            return
        with self._lock:  # the change and its line at once: whoever comes second sees both
            if self._phase == "verifying":
                return
            self._phase = "verifying"
            err.print(f"verifying {self.out}: checksums, completeness and the merged tensors' "
                      "numerics ...", highlight=False, soft_wrap=True, markup=False)

    def _say_written(self) -> None:
        """Print :func:`finished_line` once, when the writing is over."""
        with self._lock:
            if self._said_written:
                return
            self._said_written = True
            err.print(finished_line(self.tensors, self.total, time.monotonic() - self._start,
                                    self.total - self._start_bytes),
                      highlight=False, soft_wrap=True, markup=False)

    def _poll(self) -> None:
        """Redraw the bar every ``interval`` (on a terminal; elsewhere, e.g. a log file, only
        the phase lines are written)."""
        from rich.progress import BarColumn, Progress, TextColumn

        columns = [TextColumn("[bold]{task.fields[phase]}"), BarColumn(),
                   TextColumn("{task.fields[detail]}")]
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("merge", total=self.total, phase=self._phase, detail="")
            while not self._stop.wait(self.interval):
                if self._phase == "merging" and self.staging.finalized():
                    self.phase("verify")  # finalized: the flow route's verify step is next
                if err.is_terminal:
                    size, tensors = self._written()
                    detail = progress_detail(tensors, self.tensors, size, self.total,
                                             time.monotonic() - self._start,
                                             size - self._start_bytes)
                    bar.update(task, completed=size, phase=self._phase, detail=detail)

    def halt(self, line: str = "") -> None:
        """Stop the display (its bar is removed) and wait for it briefly."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # a line it is printing gets out (a busy machine is slow); an interrupt waits less
            self._thread.join(2 if line else 10)

    def finish(self, verified: bool = False) -> None:
        """The run succeeded: stop the display and say what was written and, if ``verified``,
        that it was verified (each if not said yet: a flow's verify step can begin and end
        between two looks at the staging folder, which then never shows it finalized)."""
        self.halt()
        if self.enabled:
            self._say_written()
            if verified:
                self.phase("verify")

    def __enter__(self) -> _StagingProgress:
        if self.enabled:
            self._start_bytes = self._written()[0]
            self._start = time.monotonic()
            self._thread.start()
            _on_interrupt.append(self.halt)
        return self

    def __exit__(self, *exc) -> None:
        self.halt()
        if self.halt in _on_interrupt:
            _on_interrupt.remove(self.halt)


def _help(field: str) -> str:
    """A ``merge`` option's help: its MergeSpec field's description (brackets escaped, so
    rich shows ``hf://org/name[@revision]`` as written)."""
    from rich.markup import escape

    return escape(cli_words(MergeSpec.model_fields[field].description or ""))


def _default(field: str):
    """A ``merge`` option's default: its MergeSpec field's default."""
    return MergeSpec.model_fields[field].default


@app.command()
def merge(
    adapter: Annotated[str, typer.Option(help=_help("adapter"))],
    out: Annotated[Path, typer.Option(help=_help("out"))],
    base: Annotated[str | None, typer.Option(help=_help("base"))] = _default("base"),
    dtype: Annotated[str, typer.Option(help=_help("dtype"))] = _default("dtype"),
    max_shard_size: Annotated[str, typer.Option(
        help=_help("max_shard_size"))] = _default("max_shard_size"),
    tokenizer: Annotated[Path | None, typer.Option(
        help=_help("tokenizer"))] = _default("tokenizer"),
    no_tokenizer: Annotated[bool, typer.Option(
        "--no-tokenizer", help=_help("no_tokenizer"))] = _default("no_tokenizer"),
    pad_vocab_to_multiple_of: Annotated[int | None, typer.Option(
        help=_help("pad_vocab_to_multiple_of"))] = _default("pad_vocab_to_multiple_of"),
    allow_vocab_shrink: Annotated[bool, typer.Option(
        "--allow-vocab-shrink", help=_help("allow_vocab_shrink"))] = _default("allow_vocab_shrink"),
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help=_help("overwrite"))] = _default("overwrite"),
    device: Annotated[str, typer.Option(help=_help("device"))] = _default("device"),
    save_method: Annotated[str, typer.Option(
        help=_help("save_method"))] = _default("save_method"),
    gguf_type: Annotated[str, typer.Option(help=_help("gguf_type"))] = _default("gguf_type"),
    merge_onto: Annotated[str, typer.Option(help=_help("merge_onto"))] = _default("merge_onto"),
    original_base: Annotated[str | None, typer.Option(
        help=_help("original_base"))] = _default("original_base"),
    workers: Annotated[int | None, typer.Option(help=_help("workers"))] = _default("workers"),
    block_size: Annotated[str, typer.Option(help=_help("block_size"))] = _default("block_size"),
    memory_limit: Annotated[str | None, typer.Option(
        help=_help("memory_limit"))] = _default("memory_limit"),
    prefect: Annotated[bool, typer.Option(
        "--prefect", help="Run as the Prefect flow merge-adapter (visible in the UI; without "
        "PREFECT_API_URL Prefect starts a temporary server). Default: in-process, unless "
        "PREFECT_API_URL, --dask-address or --push-to is set.")] = False,
    dask_address: Annotated[str | None, typer.Option(
        help=_help("dask_address"))] = _default("dask_address"),
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help=_help("verify"))] = _default("verify"),
    push_to: Annotated[str | None, typer.Option(help=_help("push_to"))] = _default("push_to"),
    private: Annotated[bool, typer.Option(
        "--private", help=_help("private"))] = _default("private"),
    revision: Annotated[str | None, typer.Option(help=_help("revision"))] = _default("revision"),
    create_pr: Annotated[bool, typer.Option(
        "--create-pr", help=_help("create_pr"))] = _default("create_pr"),
    commit_message: Annotated[str | None, typer.Option(
        help=_help("commit_message"))] = _default("commit_message"),
    s3_sse: Annotated[str | None, typer.Option(help=_help("s3_sse"))] = _default("s3_sse"),
    s3_kms_key_id: Annotated[str | None, typer.Option(
        help=_help("s3_kms_key_id"))] = _default("s3_kms_key_id"),
    low_disk: Annotated[bool, typer.Option(
        "--low-disk", help=_help("low_disk"))] = _default("low_disk"),
) -> None:
    """Merge ADAPTER into BASE and write a SafeTensors checkpoint to OUT."""
    fields = {name: str(value) if isinstance(value, Path) else value
              for name, value in locals().items() if name in MergeSpec.model_fields}
    try:
        spec = MergeSpec(**fields)
    except ValueError as exc:
        _fail(2, _invalid_options(exc))
    with _StopOnSignal(spec.out):  # Ctrl-C / SIGTERM: one line, exit 130 (INTERRUPTED)
        try:
            prepared = _plan(spec)
        except InputError as exc:  # refused before anything was written
            _fail(2, str(exc))
        except MergeError as exc:
            _fail(1, str(exc))
        try:
            report, ran = _execute(spec, prepared, prefect)
        except MergeError as exc:  # once the merge runs, every failure exits 1 (mergeflow.errors)
            _fail(1, str(exc))
    _print_report(report)
    if spec.push_to:
        _print_published(spec.push_to)
    _print_line(ran)


def _invalid_options(exc: ValueError) -> str:
    """A spec's validation errors on one line: ``--flag: problem`` for a field's value, the
    message itself for options that cannot go together."""
    errors = exc.errors() if hasattr(exc, "errors") else [{"loc": (), "msg": str(exc)}]
    fields = [f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
              for e in errors if e["loc"]]
    combinations = [e["msg"] for e in errors if not e["loc"]]
    return "; ".join([*(["invalid options: " + "; ".join(fields)] if fields else []),
                      *combinations])


def _fail(code: int, message: str) -> None:
    """Print ``message`` (a core message: its option names become flags, :func:`cli_words`)
    as the error on stderr and exit with ``code``."""
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(cli_words(message))}", highlight=False,
              soft_wrap=True)
    raise typer.Exit(code)


def _print_published(dest: str) -> None:
    """Say where the output went (a function of its own: in ``merge``, ``out`` is the path)."""
    out.print(f"published to {dest}")


def _print_line(text: str) -> None:
    out.print(text, highlight=False, soft_wrap=True)


def _print_notes(notes: list[str]) -> None:
    """Notes under the report on stdout; warnings (``warning: ...``) in yellow on stderr."""
    for note in notes:
        note = cli_words(note)
        if note.startswith("warning:"):
            err.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)
        else:
            out.print(f"  - {note}")


def _print_report(report: MergeReport) -> None:
    if report.status == "up-to-date":
        out.print(f"{report.out} already holds this merge; nothing to do.")
        _print_notes([n for n in report.notes if n.startswith("warning:")])
        return
    if report.shards_resumed:
        out.print(f"resumed {report.shards_resumed} of {report.shards} groups from an "
                  "interrupted run")
    if report.save_method == "lora":
        out.print(f"[bold green]exported[/] the {report.variant} adapter unmerged "
                  f"({report.lora_modules} modules, {report.tensors} tensors, "
                  f"{format_size(report.total_size)})")
        _print_notes(report.notes)
        out.print(f"output: {report.out}")
        return
    if report.save_method == "gguf":
        _print_gguf(report)
        return
    out.print(f"[bold green]merged[/] {report.lora_modules} {report.variant} modules "
              f"({report.replaced_tensors} tensors replaced, {report.lora_biases} LoRA biases) "
              f"into {report.tensors} tensors, {format_size(report.total_size)} {report.dtype} "
              f"in {report.shards} shard(s)")
    _print_notes(report.notes)
    out.print(f"output: {report.out}")


def _print_gguf(report: MergeReport) -> None:
    """A GGUF merge: what was written, and the command that imports it into Ollama."""
    from mergeflow.engine.gguf import gguf_filename, ollama_command

    out.print(f"[bold green]merged[/] {report.lora_modules} {report.variant} modules into "
              f"{gguf_filename(report.dtype)} ({report.tensors} tensors, "
              f"{format_size(report.total_size)} {report.dtype}) with an Ollama Modelfile")
    _print_notes(report.notes)
    out.print(f"output: {report.out}")
    _print_line(f"to run it in Ollama: {ollama_command(report.out, Path(report.out).name.lower())}")


webhook_app = typer.Typer(no_args_is_help=True,
                          help="Receive training / Hugging Face webhooks and start merge runs.")
app.add_typer(webhook_app, name="webhook")


@webhook_app.command("serve")
def webhook_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8787,
    deployment: Annotated[str, typer.Option(
        help="Merge deployment to run, <flow>/<deployment>.")] = "merge-adapter/merge-adapter",
    max_body_bytes: Annotated[int, typer.Option(help="Largest accepted body (413 above).")] = 65536,
    secret_block: Annotated[str | None, typer.Option(
        help="Prefect Secret block holding the training hook's HMAC secret "
             "(default: $MERGEFLOW_WEBHOOK_SECRET).")] = None,
    hf_secret_block: Annotated[str | None, typer.Option(
        help="Prefect Secret block holding the Hugging Face webhook secret "
             "(default: $MERGEFLOW_HF_WEBHOOK_SECRET).")] = None,
    hf_out_root: Annotated[str | None, typer.Option(
        help="Hugging Face hook: merge outputs go under this folder.")] = None,
    hf_push_root: Annotated[str | None, typer.Option(
        help="Hugging Face hook: publish to <root>/<name> (hf://org or s3://bucket/prefix).")] = None,
    api_url: Annotated[str | None, typer.Option(
        help="Prefect API URL (default: $PREFECT_API_URL).")] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Serve POST /hooks/training, POST /hooks/huggingface and GET /healthz (triggers.webhook)."""
    from triggers.webhook import load_settings, serve

    try:
        settings = load_settings(deployment=deployment, max_body_bytes=max_body_bytes,
                                 api_url=api_url, secret_block=secret_block,
                                 hf_secret_block=hf_secret_block, hf_out_root=hf_out_root,
                                 hf_push_root=hf_push_root)
    except ValueError as exc:
        _fail(2, str(exc))
    serve(settings, host=host, port=port, log_level=log_level)


if __name__ == "__main__":
    app()
