"""A function's answer from a forked child process, so that what it imports and builds (learning
a new base's layout imports transformers' model code: about 0.13 GiB that no merge needs again)
never stays in the merging process.

The child is a ``fork`` of this process: it starts at once, shares the modules already imported
(torch), returns its answer (or exception) pickled through a pipe and leaves with ``os._exit``.
It runs without the garbage collector: its collections would walk every object it inherited
(torch's, the pipeline's) again and again while transformers is imported, a quarter of its time
(``docs/benchmarks.md``), for memory it gives back when it leaves a second later.
Forking is only done where it is safe: a POSIX system other than macOS, a process with no other
thread (a lock held by another thread at the fork would stay held in the child forever), and no
CUDA initialized.
Anywhere else :func:`call_in_fork` returns None and the caller runs the function itself.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ChildLost(Exception):
    """The child ended without an answer (killed, out of memory): run the function here."""


class ForkedCall(Generic[T]):
    """A function running in a forked child; :meth:`result` waits for its answer."""

    def __init__(self, pid: int, answer_fd: int) -> None:
        self._pid: int | None = pid
        self._fd: int | None = answer_fd

    def result(self) -> T:
        """The function's return value; its exception re-raised here.

        Raises:
            ChildLost: the child ended without answering.
        """
        try:
            with os.fdopen(self._take_fd(), "rb") as answer:
                data = answer.read()
        except BaseException:  # e.g. Ctrl-C sent to this process alone: the child goes too
            self.cancel()
            raise
        status = self._reap(kill=False)
        if status != 0 or not data:
            raise ChildLost(f"the child process ended with status {status} and no answer")
        kind, value = pickle.loads(data)  # our own child's bytes
        if kind == "error":
            raise value
        return value

    def cancel(self) -> None:
        """Stop the child (when still running) and reap it; idempotent."""
        fd = self._take_fd()
        if fd is not None:
            os.close(fd)
        self._reap(kill=True)

    def _take_fd(self) -> int | None:
        fd, self._fd = self._fd, None
        return fd

    def _reap(self, kill: bool) -> int | None:
        """Wait for the child (SIGKILL first when ``kill``); its exit status."""
        pid, self._pid = self._pid, None
        if pid is None:
            return None
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)


def can_fork() -> bool:
    """Whether forking is safe here: ``os.fork`` exists, not macOS (its system frameworks are not
    fork-safe), no thread but this one runs, and CUDA is not initialized (a forked child cannot
    use it, and the driver's own threads run)."""
    return (hasattr(os, "fork") and sys.platform != "darwin"
            and threading.active_count() == 1 and not _cuda_initialized())


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")  # never imported just to ask
    return torch is not None and torch.cuda.is_initialized()


def call_in_fork(fn: Callable[[], T]) -> ForkedCall[T] | None:
    """Start ``fn()`` in a forked child; None (nothing started) when forking is not safe here."""
    if not can_fork():
        return None
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # e.g. ENOMEM under strict overcommit in a large process: run it here
        os.close(read_fd)
        os.close(write_fd)
        return None
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _answer(fn, write_fd)
    os.close(write_fd)
    return ForkedCall(pid, read_fd)


def _answer(fn: Callable[[], object], write_fd: int) -> None:
    """In the child: run ``fn``, write its pickled answer, leave without the parent's exit
    handlers (status 0 only when the answer was written)."""
    status = 1
    try:
        # Ctrl-C and a stop reach the whole process group: the child just ends, the parent
        # handles them as it would have without a child.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        gc.disable()  # see the module docstring
        try:
            answer: tuple[str, object] = ("value", fn())
        except Exception as exc:
            answer = ("error", exc)
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(_pickled(answer))
        status = 0
    finally:
        os._exit(status)


def _pickled(answer: tuple[str, object]) -> bytes:
    """The answer's pickle; an exception that does not pickle becomes a RuntimeError naming it."""
    try:
        return pickle.dumps(answer)
    except Exception:
        kind, value = answer
        if kind != "error":
            raise
        return pickle.dumps(("error", RuntimeError(f"{type(value).__name__}: {value}")))
