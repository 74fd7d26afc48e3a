"""Merging ahead of the plan, while a new base's layout is learnt.

Learning a base's layout the first time takes seconds (transformers' model code is imported in
the layout's child, :mod:`mergeflow.model.layout`), and the merge cannot be planned before it is
known. Meanwhile the shards are merged from a provisional plan, the one ``config.json`` alone
gives (:meth:`~mergeflow.model.layout.PendingLayout.provisional`), on a thread of their own, into a
folder beside the staging one (:attr:`~mergeflow.storage.staging.Staging.ahead`). Once the real
plan is made, a shard written ahead is kept only when the real plan plans it the same way, tensor
for tensor, from the same inputs (:func:`same_shards`); the rest are dropped and written as usual.

A shard's bytes are a function of its :class:`~mergeflow.plan.ShardPlan` and the plan's inputs
(base, adapter, original, dtype) alone: the block size and the device never change them. So a
shard kept is the shard the merge would have written; where the model's own code says something
``config.json`` does not (a transposed ``Conv1D``, renamed tensors, a vocabulary to resize), the
plans differ and nothing written ahead is kept. Merging ahead only saves time.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from mergeflow.engine.shards import ShardResult, open_merger, write_shard
from mergeflow.plan import MergePlan, TensorPlan
from mergeflow.storage.durable import durable_rename
from mergeflow.storage.staging import Staging


class _Stopped(Exception):
    """The shard being written ahead is not wanted any more."""


def same_shards(ahead: MergePlan, plan: MergePlan) -> set[str]:
    """The file names of the shards ``ahead`` plans exactly as ``plan`` does, from the same
    inputs: the shards of ``ahead`` that ``plan`` can take as written."""
    inputs = ("base", "adapter", "original", "dtype")
    if any(getattr(ahead, name) != getattr(plan, name) for name in inputs):
        return set()
    planned = {shard.filename: shard for shard in plan.shards}
    return {shard.filename for shard in ahead.shards if planned.get(shard.filename) == shard}


class MergeAhead:
    """The shards of a provisional plan, merged one after another into ``folder`` on a thread
    of its own (started at once), until :meth:`stop`. Any failure just ends it: the real plan's
    run meets the same problem and reports it."""

    def __init__(self, plan: MergePlan, folder: Path, device: str = "cpu") -> None:
        self.plan, self.folder, self.device = plan, folder, device
        self._stop = threading.Event()
        self._keep: set[str] = set()  # set with _stop: the shards worth finishing
        self._current: str | None = None
        self._written: dict[str, ShardResult] = {}
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        self._thread = threading.Thread(target=self._run, name="mergeflow-merge-ahead",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            merger = open_merger(self.plan, device=self.device)
            for shard in self.plan.shards:
                if self._stop.is_set():
                    return
                self._current = shard.filename
                self._written[shard.filename] = write_shard(shard, merger, self.folder,
                                                            self._check)
        except Exception:  # any: see the class docstring
            return

    def _check(self, tensor: TensorPlan) -> None:
        """After each tensor: abandon the shard once stopped, unless it is one to keep."""
        if self._stop.is_set() and self._current not in self._keep:
            raise _Stopped

    def stop(self, plan: MergePlan | None = None) -> None:
        """Start no other shard; finish the one being written if ``plan`` (the real plan)
        keeps it, else abandon it after its current tensor. Returns at once."""
        self._keep = same_shards(self.plan, plan) if plan is not None else set()
        self._stop.set()

    def finish(self) -> list[ShardResult]:
        """Wait for the thread; the shards written that :meth:`stop`'s plan keeps (still in
        :attr:`folder`), the others deleted, so the disk holds only what the merge uses."""
        self._thread.join()
        kept = []
        for name, result in self._written.items():
            if name in self._keep:
                kept.append(result)
            else:
                (self.folder / name).unlink(missing_ok=True)
        return kept

    def move_into(self, staging: Staging, kept: list[ShardResult]) -> None:
        """Move the shards :meth:`finish` kept into ``staging``'s folder and record them there
        as finished (durably: the shard is in place before its record)."""
        for result in kept:
            durable_rename(self.folder / result.filename, staging.folder / result.filename)
            staging.record_done(result.filename, result.model_dump_json())

    def discard(self) -> None:
        """Stop, wait, and delete :attr:`folder` with whatever is left in it."""
        if not self._stop.is_set():
            self.stop()
        self._thread.join()
        shutil.rmtree(self.folder, ignore_errors=True)
