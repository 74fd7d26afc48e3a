"""Deterministic crash points, for testing that every interruption is survivable.

``MERGEFLOW_FAULT_AT=<point>:<n>`` makes the process kill itself with SIGKILL (no cleanup, no
``finally``, like a power cut or the OOM killer) the ``n``-th time it reaches the named point.
``MERGEFLOW_FAULT_AT=<point>:<n>:pause`` instead holds the thread that reaches it there for
good (the rest of the process goes on), so a test can interrupt a merge at a known point with a
real signal (``tests/scenarios/test_interrupt.py``).
When the variable is unset, :func:`checkpoint` costs one environment lookup. This module is a
leaf (``os`` and ``signal`` only); the core calls it inline at its boundaries:

* ``tensor-written`` - after each tensor's bytes are handed to a shard's writer;
* ``shard-before-rename`` / ``shard-renamed`` - around the rename that publishes a shard file;
* ``before-planned`` / ``after-planned`` - around writing the plan into staging;
* ``before-shard-recorded`` / ``after-shard-recorded`` - around writing one shard and its record;
* ``before-manifest`` / ``after-manifest`` - around the staging manifest;
* ``before-publish-rename`` / ``after-publish-rename`` - around moving staging to the output;
* ``before-s3-put`` / ``after-s3-put`` and ``before-s3-manifest-put`` / ``after-s3-manifest-put``
  - around one S3 object and the S3 manifest;
* ``atomic-before-rename`` - inside every small durable write, before its rename.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "MERGEFLOW_FAULT_AT"
_hits: dict[str, int] = {}


def checkpoint(name: str) -> None:
    """Reach the point ``name``: SIGKILL this process (or, with ``:pause``, hold this thread)
    if ``MERGEFLOW_FAULT_AT`` asks for it now."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    spec, pause = (spec[:-len(":pause")], True) if spec.endswith(":pause") else (spec, False)
    point, _, nth = spec.rpartition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != int(nth):
        return
    if pause:
        while True:  # until a signal ends the process
            time.sleep(60)
    os.kill(os.getpid(), signal.SIGKILL)
