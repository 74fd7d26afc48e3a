"""Deterministic crash injection, for testing that every interruption is survivable.

``MERGEFLOW_FAULT_AT=<point>:<n>`` makes the process kill itself with SIGKILL (no cleanup, no
``finally``, like a power cut or the OOM killer) the ``n``-th time it reaches the named point.
When the variable is unset, :func:`checkpoint` costs one environment lookup.

Points called inline in the core:

* ``tensor-written`` - after each tensor's bytes are written into a shard's temporary file;
* ``shard-before-rename`` / ``shard-renamed`` - around the rename that publishes a shard file.

Points at function boundaries, installed by :func:`install_boundary_points` (the crash tests call
it in the child process; nothing installs them otherwise), each as ``before-<name>`` and
``after-<name>``: ``planned`` (plan written into staging), ``shard-recorded`` (a shard finished
and its record written), ``manifest`` (the staging manifest), ``publish-rename`` (staging moved
to the output folder), ``s3-put`` (one S3 object) and ``s3-manifest-put`` (the S3 manifest).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

ENV = "MERGEFLOW_FAULT_AT"
_hits: dict[str, int] = {}
_lock = threading.Lock()


def checkpoint(name: str) -> None:
    """Reach the point ``name``: SIGKILL this process if ``MERGEFLOW_FAULT_AT`` asks for it now."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.rpartition(":")
    if point != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name] == int(nth)
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


def around(func: Callable[..., Any], name: str | Callable[..., str]) -> Callable[..., Any]:
    """``func`` with the points ``before-<name>`` and ``after-<name>`` around each call
    (``name`` may be a function of the call's arguments)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        point = name(*args, **kwargs) if callable(name) else name
        checkpoint(f"before-{point}")
        result = func(*args, **kwargs)
        checkpoint(f"after-{point}")
        return result

    return wrapper


def install_boundary_points() -> None:
    """Wrap the merge's step boundaries with fault points (see the module docstring).

    For crash tests only: it replaces functions of :mod:`mergeflow.api` and a method of
    :class:`mergeflow.sinks.S3Publisher` in this process.
    """
    from mergeflow import api, sinks
    from mergeflow.output import MANIFEST

    if getattr(api, "_fault_points_installed", False):
        return
    api._prepare_staging = around(api._prepare_staging, "planned")
    api.run_shard = around(api.run_shard, "shard-recorded")
    api._write_manifest = around(api._write_manifest, "manifest")
    api.publish = around(api.publish, "publish-rename")

    def s3_point(self: Any, path: Any, name: str, *args: Any, **kwargs: Any) -> str:
        return "s3-manifest-put" if name == MANIFEST else "s3-put"

    sinks.S3Publisher._upload = around(sinks.S3Publisher._upload, s3_point)
    api._fault_points_installed = True
