"""Retry policy: only :class:`mergeflow.TransientError` is retried; everything else fails at once."""

from __future__ import annotations

import os

from prefect.tasks import exponential_backoff

from mergeflow.errors import TransientError


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed run only for a transient error."""
    try:
        state.result()
    except TransientError:
        return True
    except BaseException:
        return False
    return False


def _backoff_factor() -> float:
    # MERGEFLOW_RETRY_BACKOFF scales the delays (seconds: factor, 2x, 4x); tests set it low.
    return float(os.environ.get("MERGEFLOW_RETRY_BACKOFF", "2"))


IO_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=_backoff_factor()),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient,
}
