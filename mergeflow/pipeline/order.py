"""The pipeline's one order: which steps a prepared merge runs, and in what order.

Both routes follow :func:`steps_for` through :func:`run_steps`: the in-process route
(:mod:`mergeflow.pipeline.local`) calls each step in place, the Prefect flow (``flows/merge.py``)
runs each as its task. A new output kind is added here, once, and as a method of each route's
:class:`Steps`.

The steps, by name:

* ``up_to_date``: ``out`` already holds this merge; nothing is written.
* ``merge_low_disk``: write, verify, ship and delete one shard at a time, then the small files
  and the manifest (``low_disk``; it publishes to ``push_to`` itself).
* ``gguf_low_disk``: ``write_gguf``, shipping and deleting each GGUF file as soon as it is
  written and checked, then the small files and the manifest (``save_method=gguf`` with
  ``low_disk``; it publishes to ``push_to`` itself).
* ``write_gguf``: stream the merge into the GGUF file(s), check them, write the Modelfile, card
  and manifest in staging (``save_method=gguf``).
* ``write_shards``: write every shard not already written and verified.
* ``finalize``: config, tokenizer, index, card and - last - the manifest, in staging.
* ``verify``: checksums, completeness and the numerics of every merged tensor (``verify``).
* ``convert_gguf``: the GGUF file(s) converted from the finished shards in staging (no second
  read of the base), checked, beside them with the Modelfile; card and manifest written again
  (``save_method=merged_16bit,gguf``).
* ``publish``: the staging folder becomes ``out`` with one durable rename.
* ``upload``: publish ``out`` to ``push_to`` (manifest last).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mergeflow.pipeline.results import MergeReport, PreparedMerge, ShardResult, VerifyReport
    from mergeflow.spec import MergeSpec


@dataclass
class Carried:
    """What the steps hand on to the steps after them."""

    report: MergeReport | None = None
    results: list[ShardResult] = field(default_factory=list)
    verification: VerifyReport | None = None


class Steps(Protocol):
    """One route's way of running each step (see the module docstring for what each does)."""

    def up_to_date(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...
    def merge_low_disk(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...
    def gguf_low_disk(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...
    def write_gguf(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...
    def write_shards(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...
    def finalize(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...
    def verify(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...
    def convert_gguf(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...
    def publish(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...
    def upload(self, prepared: PreparedMerge, spec: MergeSpec, carried: Carried) -> None: ...


#: How each step is labelled in the flow's timings and logs.
STEP_LABELS = {"write_shards": "merge", "merge_low_disk": "merge, verify and upload",
               "write_gguf": "merge into gguf", "gguf_low_disk": "merge into gguf and upload",
               "convert_gguf": "convert to gguf", "up_to_date": "up to date"}


def steps_for(spec: MergeSpec, prepared: PreparedMerge) -> list[str]:
    """The names of the steps this merge runs, in order."""
    upload = ["upload"] if spec.push_to else []
    if prepared.up_to_date:
        return ["up_to_date", *upload]
    if spec.low_disk:  # it ships each shard or GGUF file itself
        return ["gguf_low_disk" if spec.writes_gguf else "merge_low_disk"]
    if not spec.writes_safetensors:
        written = ["write_gguf"]  # checked and finalized as it is written
    else:  # the GGUF from the verified shards: the base is read once
        written = ["write_shards", "finalize", *(["verify"] if spec.verify else []),
                   *(["convert_gguf"] if spec.writes_gguf else [])]
    return [*written, "publish", *upload]


class Timings(dict):
    """Wall time per pipeline stage, in seconds: ``with timings("load"): ...``."""

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[stage] = round(time.perf_counter() - start, 3)

    def step(self, name: str) -> AbstractContextManager:
        """Time step ``name`` under its label (:data:`STEP_LABELS`)."""
        return self(STEP_LABELS.get(name, name))


def run_steps(prepared: PreparedMerge, spec: MergeSpec, steps: Steps,
              around: Callable[[str], AbstractContextManager] | None = None) -> Carried:
    """Run this merge's steps (:func:`steps_for`) on ``steps``, each inside ``around(name)``
    when given (the flow times them); returns what they carried."""
    carried = Carried()
    for name in steps_for(spec, prepared):
        with around(name) if around else contextlib.nullcontext():
            getattr(steps, name)(prepared, spec, carried)
    return carried
