"""The staging folder: where a merge into ``out`` is built, and the one place that knows its layout.

A merge into ``<parent>/<name>`` is built in ``<parent>/.<name>.mergeflow-partial`` and moved to
``out`` with one durable rename once its manifest is written::

    .<name>.mergeflow-partial/
        model-00001-of-00003.safetensors      finished shards (renamed into place, fsynced)
        .model-00002-of-00003.safetensors.partial   a shard being written
        config.json, README.md, ..., merge-manifest.json (written last, by finalize)
        .mergeflow/                           state, removed on publish
            plan.json                         the plan (the contract between planning and work)
            done/<shard file>.json            one record per finished shard: size and sha256

Everything another step trusts is written durably (:func:`mergeflow.storage.durable.atomic_write`:
temporary file, fsync, rename, fsync of the folder), so after a power cut the folder holds a
consistent subset of the work: a record only names a shard that is on the disk, and the output
folder either does not exist or is finished. Replacing an output moves the old one aside to
``.<name>.mergeflow-old`` for the moment of the swap. Shards merged ahead of the plan (while a
new base's layout is learnt) are written in ``.<name>.mergeflow-ahead`` and moved in when the plan
keeps them.

This module sits just above :mod:`mergeflow.storage.durable`: it knows files and names, not plans or
tensors (callers pass the plan's text and a function that reads its fingerprint).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergeflow import faults
from mergeflow.storage import durable
from mergeflow.storage.durable import atomic_write, durable_rename, fsync_dir, fsync_file
from mergeflow.storage.hashing import sha256_file

__all__ = ["Staging", "atomic_write", "durable_rename", "fsync_dir", "fsync_file",
           "partial_path"]

STATE_DIR = ".mergeflow"  # inside staging only: plan and per-shard records; removed on publish
PLAN_FILE = "plan.json"
DONE_DIR = "done"
PARTIAL_SUFFIX = ".partial"  # a shard being written: ``.<name>.partial`` beside its final name
STAGING_SUFFIX = ".mergeflow-partial"
OLD_SUFFIX = ".mergeflow-old"
AHEAD_SUFFIX = ".mergeflow-ahead"
SHARD_GLOB = "*.safetensors"
MANIFEST_FILE = "merge-manifest.json"  # mergeflow.output.folder.MANIFEST, the last file of an output


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def _is_temporary(name: str) -> bool:
    """A half-written file an interrupted write left behind: a shard's ``.partial`` or an
    :func:`~mergeflow.storage.durable.atomic_write` temporary (``.<name>.<pid>.tmp``)."""
    return name.startswith(".") and name.endswith((PARTIAL_SUFFIX, ".tmp"))


@dataclass(frozen=True)
class Staging:
    """The staging folder of a merge into :attr:`out`, and every path and step inside it."""

    out: Path

    @classmethod
    def for_output(cls, out: Path | str) -> Staging:
        return cls(Path(out))

    @classmethod
    def from_folder(cls, folder: Path | str) -> Staging:
        """The staging folder ``folder`` (``.<name>.mergeflow-partial``) as a :class:`Staging`."""
        folder = Path(folder)
        name = folder.name
        if not (name.startswith(".") and name.endswith(STAGING_SUFFIX)):
            raise ValueError(f"{folder}: not a Mergeflow staging folder "
                             f"(.<name>{STAGING_SUFFIX})")
        return cls(folder.parent / name[1:-len(STAGING_SUFFIX)])

    @classmethod
    def from_plan(cls, plan_path: Path | str) -> Staging:
        """The staging folder that holds the plan ``plan_path``."""
        return cls.from_folder(Path(plan_path).parent.parent)

    # -- the layout -------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """Where the merge is built before it is published."""
        return self.out.parent / f".{self.out.name}{STAGING_SUFFIX}"

    @property
    def old(self) -> Path:
        """Where a replaced output is moved aside while the new one takes its place."""
        return self.out.parent / f".{self.out.name}{OLD_SUFFIX}"

    @property
    def ahead(self) -> Path:
        """Where shards are merged ahead of the plan while a new base's layout is learnt
        (:mod:`mergeflow.pipeline.ahead`); the ones the plan keeps are moved into :attr:`folder`."""
        return self.out.parent / f".{self.out.name}{AHEAD_SUFFIX}"

    @property
    def state_dir(self) -> Path:
        return self.folder / STATE_DIR

    @property
    def plan_path(self) -> Path:
        return self.state_dir / PLAN_FILE

    @property
    def done_dir(self) -> Path:
        return self.state_dir / DONE_DIR

    def done_record(self, filename: str) -> Path:
        """The record that says shard ``filename`` is finished (its size and sha256)."""
        return self.done_dir / f"{filename}.json"

    def partial(self, filename: str) -> Path:
        return partial_path(self.folder / filename)

    # -- planning and resuming --------------------------------------------------------------

    def read_plan(self) -> str | None:
        """The plan's text, or None when there is none."""
        try:
            return self.plan_path.read_text()
        except OSError:
            return None

    def begin(self, plan_text: str, fingerprint: str,
              fingerprint_of: Callable[[str], str]) -> bool:
        """Reuse the folder when it holds a plan with this ``fingerprint`` (``fingerprint_of``
        reads one from a plan's text; ValueError: unreadable) - resume, keeping finished shards
        and rewriting the plan if only its text differs (a new way to run the same merge);
        otherwise start it afresh with ``plan_text``. Returns True when resuming."""
        faults.checkpoint("before-planned")
        existing = self.read_plan()
        if existing is not None:
            try:
                same = fingerprint_of(existing) == fingerprint
            except ValueError:
                same = False
            if same:
                self.clear_leftovers()
                if existing != plan_text:
                    durable.atomic_write(self.plan_path, plan_text)
                return True
        shutil.rmtree(self.folder, ignore_errors=True)
        self.done_dir.mkdir(parents=True)
        durable.atomic_write(self.plan_path, plan_text)
        faults.checkpoint("after-planned")
        return False

    def record_done(self, filename: str, record: str) -> None:
        """Record shard ``filename`` as finished (after its file is durably in place)."""
        durable.atomic_write(self.done_record(filename), record)

    def finished(self, filename: str) -> dict | None:
        """The record of shard ``filename`` if a previous run finished it and its file still
        has the recorded size and sha256; None: it must be (re)written."""
        path = self.folder / filename
        try:
            record = json.loads(self.done_record(filename).read_text())
            size, sha256 = int(record["size"]), str(record["sha256"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256:
            return record
        return None

    # -- watching and cleaning --------------------------------------------------------------

    def progress_files(self) -> list[Path]:
        """The files whose sizes add up to the bytes written so far: finished shards and shards
        being written."""
        return [*self.folder.glob(SHARD_GLOB), *self.folder.glob(f".*{PARTIAL_SUFFIX}")]

    def finalized(self) -> bool:
        """Whether the folder holds its manifest (written last by finalize: only the checks
        and the publish are left)."""
        return (self.folder / MANIFEST_FILE).is_file()

    def published(self) -> bool:
        """Whether :attr:`out` holds a finished merge (its manifest)."""
        return (self.out / MANIFEST_FILE).is_file()

    def done_records(self) -> list[Path]:
        return list(self.done_dir.glob("*.json"))

    def leftovers(self) -> list[Path]:
        """What an interrupted run left that is never part of an output: half-written files in
        the folder, and a replaced output still aside although the new one is in place."""
        found = []
        for folder in (self.folder, self.state_dir, self.done_dir):
            if folder.is_dir():
                found += [p for p in folder.iterdir() if p.is_file() and _is_temporary(p.name)]
        if self.old.exists() and self.out.exists():
            found.append(self.old)
        if self.ahead.exists():  # an interrupted merge ahead
            found.append(self.ahead)
        return sorted(found)

    def clear_leftovers(self) -> None:
        for path in self.leftovers():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the staging folder (its output went elsewhere)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- publishing -------------------------------------------------------------------------

    def _drop_unlisted(self) -> None:
        """Delete what the manifest does not list (a file dropped into the folder after it was
        finalized), so the output holds exactly the files its manifest names."""
        try:
            manifest = json.loads((self.folder / MANIFEST_FILE).read_text())
            listed = {*manifest["files"], MANIFEST_FILE}
        except (OSError, ValueError, KeyError, TypeError):
            return  # nothing finalized: publish is refused before this by its callers
        remove_unplanned(self.folder, listed)

    def publish(self) -> None:
        """Move the finished folder to :attr:`out` (replacing what was there) by durable renames:
        the state and any leftovers are removed first, so the output holds only the model."""
        faults.checkpoint("before-publish-rename")
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.clear_leftovers()
        self._drop_unlisted()
        durable.fsync_dir(self.folder)
        if self.out.exists():
            shutil.rmtree(self.old, ignore_errors=True)
            os.replace(self.out, self.old)
            durable.durable_rename(self.folder, self.out)
        else:
            durable.durable_rename(self.folder, self.out)
        shutil.rmtree(self.old, ignore_errors=True)
        faults.checkpoint("after-publish-rename")


def remove_unplanned(folder: Path, keep: set[str]) -> list[str]:
    """Delete every visible entry of ``folder`` not named in ``keep`` (hidden names are staging's
    own state and temporaries, handled by :class:`Staging`); returns the names removed."""
    removed = []
    for path in sorted(folder.iterdir()):
        if path.name in keep or path.name.startswith("."):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed
