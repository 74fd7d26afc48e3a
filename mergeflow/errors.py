"""Mergeflow's error hierarchy.

Two families matter to callers:

* :class:`InputError` and its subclasses are *permanent*: the request or its files are wrong, and
  retrying cannot help. The CLI exits with code 2 and prints the one-line message, which names the
  file or key at fault and says what to do.
* :class:`TransientError` is the only *retryable* family (network, throttling, a busy disk).
  Orchestrators retry these and nothing else.

Everything else Mergeflow raises is a plain :class:`MergeError` (exit code 1).
"""

from __future__ import annotations


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


class DiskSpaceError(InputError):
    """The output's disk has too little free space for the merge (found before any work by the
    preflight check, or as ENOSPC while writing); free space or write elsewhere, then rerun."""
