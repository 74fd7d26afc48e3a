"""Mergeflow's error hierarchy.

Two families matter to callers:

* :class:`InputError` and its subclasses are *permanent*: the request or its files are wrong, and
  retrying cannot help. Planning (``mergeflow.pipeline.steps.prepare``) raises them before any output is
  written; the CLI then exits with code 2 and prints the one-line message, which names the file
  or key at fault and says what to do.
* :class:`TransientError` is the only *retryable* family (network, throttling, a busy disk).
  Orchestrators retry these and nothing else.

Everything else Mergeflow raises is a plain :class:`MergeError` (exit code 1).

Exit codes follow the phase: ``2`` only for a refusal at planning, before anything was written.
Once the merge runs, every failure exits ``1``, whatever its class: a full disk mid-merge
(:class:`DiskSpaceError`; the staging folder is kept and a rerun resumes), a destination that
fails after ``--out`` was published (:class:`UploadError`, saying what is published where), a
base file that changed under the merge. Every ENOSPC / EDQUOT is a :class:`DiskSpaceError`
(:func:`disk_full_error`), never a bare ``OSError``.
"""

from __future__ import annotations

import errno
import os

#: The errnos of a full disk: no space left, or over quota.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class MergeError(Exception):
    """Base class of every error Mergeflow raises on purpose."""


class TransientError(MergeError):
    """A failure that may succeed when retried (network, throttling, timeouts)."""


class InputError(MergeError):
    """A permanent problem with the request or its input files (CLI exit code 2)."""


class CheckpointError(InputError):
    """A base checkpoint file or index is missing, corrupt or inconsistent."""


class AdapterError(InputError):
    """The adapter's config or weights are unreadable, unsupported or inconsistent."""


class PlanError(InputError):
    """The adapter does not fit the base (missing module, shape mismatch, vocab conflict)."""


class OutputError(InputError):
    """The output location cannot be used (not empty, inside an input, owned by another merge)."""


class VerificationError(MergeError):
    """A written output failed its checks (checksums, completeness, numerics)."""


class SourceError(InputError):
    """An input reference (local path, ``hf://``, ``s3://``) cannot be resolved: missing repo,
    revision, bucket or prefix, no access, or not in the cache while offline."""


class SinkError(InputError):
    """A publish destination (``hf://``, ``s3://``) cannot be used: missing bucket, no write
    access, bad repo id, or the folder to publish is not a finished merge."""


class OptionsError(InputError, ValueError):
    """Options that cannot go together (``mergeflow.spec.MergeSpec.option_problems``), raised
    by the Python API; also a ``ValueError``, like the spec's other validation errors."""


class DiskSpaceError(MergeError):
    """The disk filled up (ENOSPC or EDQUOT) while the merge was writing: nothing is published,
    the staging folder and its finished groups are kept; free space (or write elsewhere), then
    rerun to resume. Exit code 1: the refusal before any work is :class:`NotEnoughDiskSpace`."""


class NotEnoughDiskSpace(DiskSpaceError, InputError):
    """The preflight estimate found too little free space for the merge before anything was
    written (exit code 2)."""


class UploadError(MergeError):
    """Publishing to ``push_to`` failed after the merge was published to ``out`` (or, in
    low-disk mode, after some shards were shipped). The message says what is published and what
    is not; rerunning the same request finishes the upload without merging again (exit code 1)."""


class TransientUploadError(UploadError, TransientError):
    """An :class:`UploadError` whose cause is transient: retried like any TransientError."""


#: How a full disk's message ends when nothing was staged yet.
NOTHING_STAGED = "nothing is published; free space (or write elsewhere), then rerun"


def staging_kept(staging: str | os.PathLike) -> str:
    """How a full disk's message ends once the merge has a staging folder: it is kept, and a
    rerun resumes from its finished groups."""
    return (f"the staging folder {staging} is kept: free space (or move it and `out` to a bigger "
            "disk), then rerun the same command to resume from its finished groups")


def disk_full_message(where: str | os.PathLike, errnum: int, detail: str = "",
                      kept: str = NOTHING_STAGED) -> str:
    """The one wording of a full disk: ``<file>: no space left on the device (<strerror>)
    <detail>; <kept>`` (``kept``: what is left and how to go on)."""
    return f"{where}: no space left on the device ({os.strerror(errnum)}){detail}; {kept}"


def disk_full_error(exc: OSError, where: str | os.PathLike, kept: str) -> DiskSpaceError | None:
    """``exc`` as a :class:`DiskSpaceError` when it is a full disk (None otherwise): naming the
    file (``exc.filename``, else ``where``), and ending with ``kept``, what is left and how to
    go on."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_FULL:
        return None
    return DiskSpaceError(disk_full_message(exc.filename or where, exc.errno, kept=kept))
