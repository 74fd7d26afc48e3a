"""The progress display of a running merge (:class:`StagingProgress`), fed by watching the
staging folder grow, and the figures it shows: tensors and bytes done of the total, the write rate
and the time left (:func:`progress_detail`), the line left when the writing is done
(:func:`finished_line`)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mergeflow.cli.report import err
from mergeflow.cli.signals import on_interrupt
from mergeflow.spec import format_size

if TYPE_CHECKING:
    from mergeflow.pipeline.results import PreparedMerge


def format_rate(bytes_per_second: float | None) -> str:
    """A write rate for people: ``85.00 MB/s``, ``1.20 GB/s``; ``-`` before anything moved."""
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


def finished_line(tensors: int, bytes_total: int, seconds: float, bytes_this_run: int,
                  bytes_ahead: int = 0) -> str:
    """The line left on stderr when the writing is done, e.g. ``wrote 40/40 tensors, 1.20 GB
    in 3.1 s (387.10 MB/s)``: the time and rate of the run phase, over the bytes it wrote
    (resumed ones left out). ``bytes_ahead``, merged during planning while the base's layout was
    learnt, is said apart, since neither that time nor those bytes are the run phase's."""
    written = f"wrote {tensors}/{tensors} tensors, {format_size(bytes_total)}"
    if bytes_ahead and bytes_this_run <= 0:
        return f"{written} (all merged while the base's layout was learnt)"
    rate = format_rate(bytes_this_run / seconds if seconds > 0 else None)
    line = f"{written} in {seconds:.1f} s ({rate})"
    if bytes_ahead:
        line += f"; {format_size(bytes_ahead)} of it merged while the base's layout was learnt"
    return line


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


class StagingProgress:
    """The progress display, fed by watching the staging folder grow, so it works the same
    whatever runs the groups (threads, processes, a Dask cluster sharing the disk): tensors and
    bytes done, rate and ETA on a transient bar; the verify phase and the finished writing as
    lines on stderr."""

    def __init__(self, prepared: PreparedMerge, interval: float = 0.25,
                 enabled: bool = True, verifies: bool = True) -> None:
        from mergeflow.storage.staging import Staging

        self.staging = Staging.for_output(prepared.out)
        self.out = prepared.out
        self.total = prepared.total_size
        self.ahead = sum(result.size for result in prepared.written_ahead)
        self.tensors = prepared.tensor_count
        self.interval = interval
        self.enabled = enabled
        self.verifies = verifies  # a verify step follows the writing (no --no-verify, ...)
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
        """The merge entered step ``name`` ("verify", "gguf", "publish"; called from the thread
        that runs the merge): the writing is over, so say what was written; a verify phase and
        a GGUF conversion (``merged_16bit,gguf``) get their own line on stderr."""
        if not self.enabled:
            return
        self._say_written()
        if name == "gguf":
            with self._lock:
                self._phase = "converting"
            err.print(f"converting the shards of {self.out} into GGUF ...", highlight=False,
                      soft_wrap=True, markup=False)
            return
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
                                    self.total - self._start_bytes, self.ahead),
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
                if self.verifies and self._phase == "merging" and self.staging.finalized():
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

    def __enter__(self) -> StagingProgress:
        if self.enabled:
            self._start_bytes = self._written()[0]
            self._start = time.monotonic()
            self._thread.start()
            on_interrupt.append(self.halt)
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt()
        if self.halt in on_interrupt:
            on_interrupt.remove(self.halt)
