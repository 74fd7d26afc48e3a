"""One writer per output: an exclusive ``fcntl.flock`` on a lock file named by the output's
absolute path, in the machine's temporary folder (``<tmp>/mergeflow-locks/``, so nothing is
written beside an output a refused merge must leave untouched), held by the process that plans
and runs a merge into it.

A second merge into the same ``out`` does not wait: it stops at once with one line naming the
process that holds the output (exit 2, nothing written). Waiting would leave a scheduled or
webhook-started run hanging behind a merge that may take an hour, and its own work would be
done by the first (a rerun afterwards finds the output up to date, or resumes it); a refusal
that names the holder is what a person or a scheduler can act on. The kernel drops the lock
when its process dies, so a crash never leaves the output locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mergeflow.errors import OutputError

_held: dict[str, int] = {}  # lock path -> depth, for the locks this process holds
_fds: dict[str, int] = {}  # lock path -> the descriptor holding its flock
_guard = threading.Lock()


def _close_in_child() -> None:
    """In a forked child (a layout's, :mod:`mergeflow.model.forked`): close the inherited lock
    descriptors. A ``flock`` belongs to the open file, which a child shares, so a child that
    outlived its killed parent would otherwise keep the output locked until it ended."""
    for fd in _fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _fds.clear()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def lock_path(out: str | Path) -> Path:
    """The lock file of an output: ``<tmp>/mergeflow-locks/<sha256 of its absolute path>.lock``
    (``MERGEFLOW_LOCK_DIR`` overrides the folder). Outputs on a shared filesystem written from
    several machines need a lock folder they share."""
    folder = Path(os.environ.get("MERGEFLOW_LOCK_DIR") or Path(tempfile.gettempdir(), "mergeflow-locks"))
    digest = hashlib.sha256(str(Path(out).absolute()).encode()).hexdigest()[:24]
    return folder / f"{digest}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold ``out``'s lock for the block (re-entrant within this process).

    Raises:
        OutputError: another process holds it (naming that process).
    """
    path = lock_path(out)
    key = str(path)
    with _guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    owner = os.getpid()  # a forked child unwinding this frame has closed its copy already
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"`out={out}`: another merge is writing it ({_holder(path)}); "
                              "wait for it to finish, or choose another `out`") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        with _guard:
            _held[key] = 1
            _fds[key] = fd
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
                _fds.pop(key, None)
            if os.getpid() == owner:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        if os.getpid() == owner:
            os.close(fd)
