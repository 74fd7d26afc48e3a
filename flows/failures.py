"""How a failed run reads in the Prefect UI: a merge refused or stopped for a reason Mergeflow
names (a :class:`~mergeflow.errors.MergeError`: bad input, a full disk, a failed upload, ...) is
the one line that says what and how to fix it, without the tracebacks Prefect's engines attach
to every failure. Anything else - a bug - keeps its traceback. Retries are untouched: this only
changes what the log says."""

from __future__ import annotations

import logging

from mergeflow.errors import MergeError

#: The loggers Prefect's flow and task engines report failures through.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_ENGINE_EXIT = "Engine execution exited with unexpected exception"


class OneLineMergeErrors(logging.Filter):
    """Drop the traceback of a record about a MergeError (its message already holds the line),
    and the engine's extra "exited with unexpected exception" record about one."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, MergeError):
            return True
        if record.getMessage() == _ENGINE_EXIT:
            return False  # the failure was logged already, as one line
        record.exc_info = None
        record.exc_text = None
        return True


def install() -> None:
    """Attach the filter to Prefect's run loggers (once per process)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineMergeErrors) for f in logger.filters):
            logger.addFilter(OneLineMergeErrors())
