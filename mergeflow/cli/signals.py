"""Ctrl-C (SIGINT) and SIGTERM while a merge runs: one line on stderr naming what is kept
(:func:`interrupted_line`), exit :data:`INTERRUPTED` (:class:`StopOnSignal`); the merge runs off
the main thread (:func:`in_thread`) so that only the handler sees the signal."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from mergeflow.cli.report import err

T = TypeVar("T")

#: The exit code of a merge stopped by Ctrl-C (SIGINT) or by SIGTERM: 128 + SIGINT, what a shell
#: reports for Ctrl-C. SIGTERM exits with the same code (not 143), so a caller tests for one code
#: meaning "interrupted; staging is kept and a rerun resumes".
INTERRUPTED = 130

#: Called with the interrupt line when a signal stops the merge (the progress display, the
#: Prefect run started from here), before the line is printed and the process exits.
on_interrupt: list[Callable[[str], None]] = []


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


def batch_interrupted_line(outs: Sequence[str | Path]) -> str:
    """The one line printed when a signal stops a batch (several outputs): which outputs keep
    their staging folder, how many are finished, and that rerunning resumes them."""
    from mergeflow.storage.staging import Staging

    kept = [Path(out).name for out in outs if Staging.for_output(out).folder.is_dir()]
    done = sum(1 for out in outs if Staging.for_output(out).published())
    parts = [f"staging kept for {len(kept)} of {len(outs)} outputs ({', '.join(kept)})"] \
        if kept else []
    parts += [f"{done} of {len(outs)} finished"] if done else []
    if not parts:
        return "interrupted before anything was staged; rerun the same command to start the merges"
    return f"interrupted: {'; '.join(parts)}; rerun the same command to resume"


class StopOnSignal:
    """SIGINT and SIGTERM while a merge runs: run the :data:`on_interrupt` hooks, print
    :func:`interrupted_line` (a batch: :func:`batch_interrupted_line`) on stderr and exit
    :data:`INTERRUPTED` at once (``os._exit``: worker threads and the writer stop where they
    are; staging survives that like a power cut, see docs/reliability.md, and a rerun resumes).
    No traceback: the work runs off the main thread (:func:`in_thread`), so only this handler
    sees the signal."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, out: str | Path | Sequence[str | Path]) -> None:
        self.out = out  # one output, or a batch's outputs
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        for signum in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[signum] = signal.signal(signum, self._stop)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _stop(self, signum: int, frame: object) -> None:
        for other in self.SIGNALS:  # a second Ctrl-C while stopping changes nothing
            signal.signal(other, signal.SIG_IGN)
        line = interrupted_line(self.out) if isinstance(self.out, str | Path) \
            else batch_interrupted_line(self.out)
        for hook in reversed(on_interrupt):
            with contextlib.suppress(Exception):
                hook(line)
        err.print(line, highlight=False, soft_wrap=True, markup=False)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(INTERRUPTED)


def in_thread(work: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``work(*args, **kwargs)`` on a thread of its own while this thread waits, returning its
    result or raising its exception. Run from the main thread, signals then reach
    :class:`StopOnSignal` at once, and Prefect's flow engine, off the main thread, installs no
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
