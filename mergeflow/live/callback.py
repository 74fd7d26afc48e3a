"""``MergeOnTrainEnd``: a ``transformers.TrainerCallback`` that merges (or hands off the merge of)
the adapter a ``Trainer`` - or any TRL trainer, which subclass it - just finished training.

At ``on_train_end``, on the main process only, it saves the active adapter (PEFT's
``save_pretrained``, plus the trainer's tokenizer) to ``adapter_dir`` and writes the ``_COMPLETE``
marker last (the marker the folder watcher of ``triggers.finished`` waits for). Then either:

* ``notify=None``: it merges in this process with
  :func:`mergeflow.live.save.save_pretrained_merged` (the base on disk, or the live weights), into
  ``out``, publishing to ``push_to`` when set; or
* ``notify=<notifier>``: it announces the finished adapter so the merge runs elsewhere (the GPU
  pool): ``triggers.training.PrefectEvent()`` emits ``mergeflow.adapter.ready``,
  ``triggers.training.Webhook(url)`` makes a signed POST to ``mergeflow webhook serve``. Any
  object with ``announce(request: dict) -> dict`` works; the core imports no Prefect.

A failure never passes silently: it is logged as an error naming the saved adapter and the
command that merges it, then raised (:class:`MergeAfterTrainingError`) out of
``trainer.train()``, so the training script exits non-zero unless it catches it. The adapter is
already saved by then: nothing trained is lost.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

from transformers import TrainerCallback

from mergeflow.errors import InputError, MergeError
from mergeflow.storage.staging import atomic_write

log = logging.getLogger("mergeflow.live.callback")

MARKER = "_COMPLETE"


class Notifier(Protocol):
    """Announces a finished adapter so that a merge runs elsewhere."""

    def announce(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``request`` (``adapter``, ``out``, ``base``, ``push_to``, ``options``); return
        what the receiver answered (e.g. the flow run id)."""
        ...


class MergeAfterTrainingError(MergeError):
    """Training finished and its adapter is saved, but the merge (or its announcement) failed."""


class MergeOnTrainEnd(TrainerCallback):
    """Save the trained adapter at the end of training, then merge it or announce it.

    Args:
        out: the merged model's folder (for ``notify``: a path the merging machine can write).
        push_to: publish the merge to ``hf://org/name`` or ``s3://bucket/prefix``.
        notify: None (merge in this process) or a notifier (see the module docstring).
        adapter_dir: where the adapter is saved; default ``<output_dir>/adapter``.
        base: the base checkpoint for the merge. In-process: as ``save_pretrained_merged``'s
            ``base`` (default: found on disk, else the live weights). With ``notify`` it must
            be a reference the merging machine can read; default: the adapter config's
            ``base_model_name_or_path`` (a bare Hub id becomes ``hf://org/name``).
        **merge_options: ``save_pretrained_merged`` options (``save_method``, ``dtype``,
            ``max_shard_size``, ...); with ``notify``, MergeSpec fields sent along.

    Attributes:
        report: the in-process merge's report, once done.
        answer: the notifier's answer, once announced.
    """

    def __init__(self, out: str | os.PathLike, push_to: str | None = None,
                 notify: Notifier | None = None, *, adapter_dir: str | os.PathLike | None = None,
                 base: str | os.PathLike | None = None, **merge_options: Any) -> None:
        if notify is not None and not callable(getattr(notify, "announce", None)):
            raise InputError(f"notify={notify!r}: pass None (merge here) or a notifier such as "
                             "triggers.training.PrefectEvent() or triggers.training.Webhook(url)")
        self.out, self.push_to, self.notify = str(out), push_to, notify
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.base = str(base) if base is not None else None
        self.merge_options = merge_options
        self.report = None
        self.answer: dict[str, Any] | None = None

    # -- the Trainer's events ---------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Refuse, before any training, a handoff whose merge could not find the base."""
        if self.notify is not None and state.is_world_process_zero and model is not None:
            self.base_reference(model)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Save the adapter (marker last), then merge or announce it (main process only)."""
        if not state.is_world_process_zero:
            return
        if model is None:
            raise MergeAfterTrainingError("MergeOnTrainEnd: the trainer passed no model")
        tokenizer = processing_class if hasattr(processing_class, "save_pretrained") else None
        adapter_dir = self.adapter_dir or Path(args.output_dir) / "adapter"
        save_adapter(model, adapter_dir, tokenizer)
        try:
            if self.notify is None:
                self.report = self.merge_here(model, tokenizer)
            else:
                self.answer = self.notify.announce(self.request(model, adapter_dir))
                log.info("adapter %s announced: %s", adapter_dir, self.answer)
        except Exception as exc:
            what = "merge" if self.notify is None else "announcement"
            log.error("training finished and the adapter is saved in %s, but its %s failed: "
                      "%s. Merge it with: mergeflow merge --adapter %s --out %s%s", adapter_dir,
                      what, exc, adapter_dir, self.out,
                      f" --base {self.base}" if self.base else "", exc_info=True)
            raise MergeAfterTrainingError(
                f"the adapter is saved in {adapter_dir}, but its {what} failed: {exc}") from exc

    # -- the two ways ------------------------------------------------------------------------

    def merge_here(self, model: Any, tokenizer: Any):
        """The in-process merge (the report)."""
        from mergeflow.live.save import save_pretrained_merged

        return save_pretrained_merged(model, self.out, tokenizer, base=self.base,
                                      push_to=self.push_to, **self.merge_options)

    def request(self, model: Any, adapter_dir: Path) -> dict[str, Any]:
        """What a notifier sends: the MergeSpec fields of the merge to run."""
        return {"adapter": str(Path(adapter_dir).absolute()), "out": self.out,
                "base": self.base_reference(model), "push_to": self.push_to,
                "options": dict(self.merge_options)}

    def base_reference(self, model: Any) -> str:
        """The base as a reference another machine can read.

        Raises:
            InputError: the base is only in memory, or named by nothing readable.
        """
        if self.base:
            return self.base
        configs = getattr(model, "peft_config", {})
        active = getattr(model, "active_adapters", None) or list(configs)[:1]
        ref = getattr(configs.get(active[0]) if active else None, "base_model_name_or_path",
                      None) or getattr(model, "name_or_path", None)
        if ref and Path(ref).is_dir():
            return str(Path(ref).absolute())
        if ref and ref.count("/") == 1 and not ref.startswith((".", "/")):
            return f"hf://{ref}"
        if ref and ref.startswith(("hf://", "s3://")):
            return ref
        where = ref or "built in memory"
        raise InputError(f"MergeOnTrainEnd(notify=...): the model's base ({where}) is not a "
                         "checkpoint another machine can read; pass "
                         "base=PATH (or hf://org/name, s3://...), or notify=None to merge here")


def save_adapter(model: Any, folder: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Save the active adapter and the tokenizer to ``folder``, the ``_COMPLETE`` marker last
    (removed first, so a half-written folder never looks finished). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    model.save_pretrained(folder, selected_adapters=list(model.active_adapters),
                          safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    atomic_write(folder / MARKER, "")
    return folder
