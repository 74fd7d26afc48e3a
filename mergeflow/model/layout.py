"""What the model's own code says about its tensors: which is the input embedding, which the
output head, whether they are tied, which layers store weights transposed (``Conv1D``), and
how its tensors in memory map to the checkpoint's on disk (:mod:`mergeflow.model.modelmap`).

The model is instantiated from its config on the ``meta`` device (no memory, no weights), so this
works for any architecture transformers knows, without a list of model names. Importing
transformers and building the model costs seconds, so the answer is cached as JSON in the
Mergeflow cache folder (``$MERGEFLOW_CACHE/layout/``), keyed by the canonical JSON of
``config.json``, the set of tensor names, and the Mergeflow and installed transformers versions:
a second merge of the same base imports no transformers. A damaged cache entry is ignored and
rewritten. A merge asks with :func:`start_layout`, which learns a new base's layout in a forked
child, so that transformers' model code (0.13 GiB) never enters the merging process; the same
child answers PEFT's wrapped parameters too (``extra``) for an adapter with ``target_parameters``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergeflow.errors import PlanError
from mergeflow.model.config import config_digest
from mergeflow.model.forked import ChildLost, ForkedCall, call_in_fork
from mergeflow.model.meta import meta_model
from mergeflow.model.modelmap import ModelMap, read_model_map
from mergeflow.storage.memo import installed_version, memo_path, read_memo, write_memo

CACHE_FORMAT = 4  # 3: the model map records tensors held under two names; 4: linear modules


@dataclass
class ModelLayout:
    """Embedding/head names (disk tensor names, ``.weight`` included), transposed modules, and
    the in-memory -> disk map.

    ``conv1d`` and ``linear`` hold disk module names (the weight's name less ``.weight``):
    ``linear`` is every ``torch.nn.Linear`` of the model (what FP8 export quantizes).
    """

    embed: str | None
    head: str | None
    tied: bool
    conv1d: set[str] = field(default_factory=set)  # module names whose weight is (in, out)
    linear: set[str] = field(default_factory=set)  # torch.nn.Linear module names
    model_map: ModelMap = field(default_factory=ModelMap)

    def disk_module(self, module: str) -> str:
        """The disk name of an in-memory module (its weight renamed, less ``.weight``)."""
        return _renamed_module(module, self.model_map.disk_name)

    def memory_module(self, module: str) -> str:
        """The in-memory name of a disk module (the inverse of :meth:`disk_module`)."""
        return _renamed_module(module, self.model_map.memory_name)


def _renamed_module(module: str, rename: Callable[[str], str]) -> str:
    """A module's name on the other side of the model map: the one owner of the rule that a
    module is renamed as its weight (``module.weight``) is; ``module`` itself when the renamed
    weight is not a ``.weight``."""
    name = rename(f"{module}.weight")
    return name[: -len(".weight")] if name.endswith(".weight") else module


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def _module_names(model) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def read_layout(config_dir: Path, tensor_names: set[str], config: dict,
                shapes: dict[str, tuple[int, ...]] | None = None) -> ModelLayout:
    """Find the embedding, head, tie and Conv1D modules of the base model, and map its tensors in
    memory to the checkpoint's (cached), in this process.

    ``config`` is the parsed ``config.json`` of ``config_dir``; ``shapes`` the checkpoint's tensor
    shapes (names only: ``tensor_names``, with unknown shapes). Falls back to ``config.json``
    alone when transformers cannot build the architecture (then no module is known to be
    transposed, and embedding/head changes are refused); that answer is not cached.
    """
    return _LayoutQuery(config_dir, tensor_names, config, shapes).answer()


def start_layout(config_dir: Path, tensor_names: set[str], config: dict,
                 shapes: dict[str, tuple[int, ...]] | None = None, *,
                 fork: bool = True, extra: Callable[[], object] | None = None) -> PendingLayout:
    """:func:`read_layout`, started now: a base whose layout is not cached has it learnt in a
    forked child (:mod:`mergeflow.model.forked`), so transformers' model code is never imported
    into this process, and this process can go on meanwhile; in this process where forking is
    not safe, or with ``fork=False``. Call :meth:`PendingLayout.result` for the layout, or
    :meth:`PendingLayout.cancel`.

    ``extra``: another question for the model's own code (PEFT's wrapped parameters), asked in
    the same child after the layout (alone, when the layout is cached), so that a new base costs
    one child, and its answer taken with :meth:`PendingLayout.extra`.
    """
    query = _LayoutQuery(config_dir, tensor_names, config, shapes)
    cached = query.cached()
    child = None
    if fork and (cached is None or extra is not None):
        child = call_in_fork(functools.partial(_ask_in_child, None if cached else query, extra))
    return PendingLayout(query, cached, child, extra)


Outcome = tuple[str, object]  # ("value", answer) or ("error", exception)
ChildAnswer = tuple[ModelLayout | None, Outcome | None]


def _ask_in_child(query: _LayoutQuery | None, extra: Callable[[], object] | None) -> ChildAnswer:
    """In the child: the layout learnt (None when not asked, or transformers cannot build the
    model), then ``extra``'s outcome (None when not asked). The layout's errors end the child's
    call; ``extra``'s are carried in its outcome."""
    learnt = query.learn() if query is not None else None
    if extra is None:
        return learnt, None
    try:
        return learnt, ("value", extra())
    except Exception as exc:
        return learnt, ("error", exc)


class PendingLayout:
    """A layout being learnt (:func:`start_layout`)."""

    def __init__(self, query: _LayoutQuery, cached: ModelLayout | None,
                 child: ForkedCall[ChildAnswer] | None,
                 extra: Callable[[], object] | None = None) -> None:
        self._query, self._layout, self._child = query, cached, child
        self._extra = extra
        self._learnt: ModelLayout | None = None  # the child's layout, once collected
        self._extra_outcome: Outcome | None = None  # the child's answer to extra

    def result(self) -> ModelLayout:
        """The layout: cached, the child's answer (its errors re-raised here), or learnt here
        when no child runs or the child was lost."""
        if self._layout is None:
            self._collect()
            self._layout = self._query.answer(learnt=self._learnt)
        return self._layout

    def extra(self) -> object:
        """The answer to ``extra`` (its error re-raised here): the child's, or asked here when
        no child ran or it was lost."""
        if self._extra is None:
            raise ValueError("start_layout was given no extra question")
        self._collect()
        if self._extra_outcome is None:
            return self._extra()
        kind, value = self._extra_outcome
        if kind == "error":
            raise value  # type: ignore[misc]
        return value

    @property
    def learning(self) -> bool:
        """Whether the layout is being learnt in a child now (not cached, not yet collected):
        :meth:`result` will wait for it."""
        return self._layout is None and self._child is not None

    def provisional(self) -> ModelLayout:
        """What ``config.json`` alone says (the fallback of :meth:`_LayoutQuery.answer`), to
        plan with while the layout is learnt: right for most models, but nothing may rely on
        it without comparing against the plan made from :meth:`result`."""
        return self._query.fallback()

    def cancel(self) -> None:
        """Stop the child, if one runs."""
        if self._child is not None:
            self._child.cancel()
            self._child = None

    def _collect(self) -> None:
        """Take the child's answers, once (errors of its layout re-raised). The layout stays
        None when the child was lost or transformers could not build the model in it (asked
        again here, so that nothing about the child, e.g. what it inherited, can turn a layout
        into the config.json fallback)."""
        child, self._child = self._child, None
        if child is None:
            return
        with contextlib.suppress(ChildLost):
            self._learnt, self._extra_outcome = child.result()


class _LayoutQuery:
    """One base's layout question: its cache entry, learning it, and storing the answer."""

    def __init__(self, config_dir: Path, tensor_names: set[str], config: dict,
                 shapes: dict[str, tuple[int, ...]] | None) -> None:
        self.config_dir, self.config = config_dir, config
        self.shapes = shapes if shapes is not None else {n: () for n in tensor_names}
        self.path = _cache_path(config_dir, self.shapes)

    def cached(self) -> ModelLayout | None:
        """The cached answer, or None."""
        return _load_cached(self.path) if self.path is not None else None

    def learn(self) -> ModelLayout | None:
        """The answer from the model's own code (transformers); None when it cannot build it."""
        return _model_layout(self.config_dir, self.shapes, self.config)

    def answer(self, learnt: ModelLayout | None = None) -> ModelLayout:
        """The layout: ``learnt`` (then stored in the cache), else the cached one or one learnt
        here; the fallback from ``config.json`` when transformers cannot build the model."""
        if learnt is None:
            cached = self.cached()
            if cached is not None:
                return cached
            learnt = self.learn()
            if learnt is None:
                return self.fallback()
        if self.path is not None:
            _store(self.path, learnt)
        return learnt

    def fallback(self) -> ModelLayout:
        """The layout from ``config.json`` alone: no embedding or head known, nothing
        transposed, the tie as the config says."""
        return ModelLayout(embed=None, head=None, tied=bool(self.config.get("tie_word_embeddings")))


def _model_layout(config_dir: Path, shapes: dict[str, tuple[int, ...]],
                  config: dict) -> ModelLayout | None:
    """The layout from the model's own code; None when transformers cannot build it."""
    try:
        model, hf_config = meta_model(config_dir)
    except Exception:
        return None
    names = _module_names(model)
    from transformers.pytorch_utils import Conv1D

    model_map = read_model_map(model, shapes)
    disk = ModelLayout(None, None, False, model_map=model_map)
    conv1d = {disk.disk_module(n) for n, m in model.named_modules() if isinstance(m, Conv1D)}
    import torch

    linear = {disk.disk_module(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    embed_module = model.get_input_embeddings()
    head_module = model.get_output_embeddings()
    embed = f"{names[id(embed_module)]}.weight" if embed_module is not None else None
    head = f"{names[id(head_module)]}.weight" if head_module is not None else None
    embed = model_map.disk_name(embed) if embed is not None else None
    head = model_map.disk_name(head) if head is not None else None
    tied = bool(getattr(_text_config(hf_config), "tie_word_embeddings", False))
    if head is not None and not tied and head not in shapes:
        raise PlanError(
            f"{config_dir}: config.json says tie_word_embeddings is false but the checkpoint has "
            f"no '{head}'; the base checkpoint is incomplete"
        )
    return ModelLayout(embed=embed, head=head, tied=tied and head is not None, conv1d=conv1d,
                       linear=linear, model_map=model_map)


# -- the cache ------------------------------------------------------------------------------


def _cache_path(config_dir: Path, shapes: dict[str, tuple[int, ...]]) -> Path | None:
    """Where the layout of this ``config.json`` (the file transformers reads) and tensor set
    (names and shapes) is cached; None when the config cannot be read as JSON (then nothing is
    cached)."""
    config = config_digest(config_dir)
    if config is None:
        return None
    return memo_path("layout", {
        "format": CACHE_FORMAT, "config": config,
        "tensors": hashlib.sha256("\n".join(f"{n}:{list(shapes[n])}" for n in sorted(shapes))
                                  .encode()).hexdigest(),
        "transformers": installed_version("transformers")})


def _load_cached(path: Path) -> ModelLayout | None:
    """A cached layout, or None when there is none or it is damaged in any way."""
    data = read_memo(path)
    if data is None or data.get("format") != CACHE_FORMAT:
        return None
    embed, head, tied, conv1d, linear = (data.get(k) for k in
                                         ("embed", "head", "tied", "conv1d", "linear"))
    if not (all(v is None or isinstance(v, str) for v in (embed, head)) and isinstance(tied, bool)
            and all(isinstance(names, list) and all(isinstance(n, str) for n in names)
                    for names in (conv1d, linear))):
        return None
    try:
        model_map = ModelMap.from_json(data["model_map"])
    except (KeyError, TypeError, ValueError):
        return None
    return ModelLayout(embed=embed, head=head, tied=tied, conv1d=set(conv1d), linear=set(linear),
                       model_map=model_map)


def _store(path: Path, layout: ModelLayout) -> None:
    write_memo(path, {"format": CACHE_FORMAT, "embed": layout.embed, "head": layout.head,
                      "tied": layout.tied, "conv1d": sorted(layout.conv1d),
                      "linear": sorted(layout.linear),
                      "model_map": layout.model_map.to_json()})
