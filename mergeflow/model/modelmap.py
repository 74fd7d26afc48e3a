"""From the model in memory to the checkpoint on disk, as transformers itself maps them.

An adapter names what PEFT saw: the modules and parameters of the model *in memory*. The base
checkpoint on disk may use other names (a Llava checkpoint's ``language_model.model.layers...``
is ``model.language_model.layers...`` in memory; GPT-NeoX's ``embed_out`` is ``lm_head``) and
other shapes: a Mixtral checkpoint stores each expert's ``w1``/``w3``/``w2`` as its own tensor,
while the model in memory stacks them into one ``experts.gate_up_proj`` of shape
``(experts, 2 * intermediate, hidden)``.

transformers' loader (``from_pretrained``) converts one into the other with the conversion
mapping of the architecture (:func:`transformers.conversion_mapping.get_model_conversion_mapping`:
renamings, and converters such as "stack the experts, then concatenate gate and up"). This module
runs the loader's own key matching (``rename_source_key``) over the checkpoint's tensor names, on a
model built on the ``meta`` device, and interprets the converters' operations on *indices*, not
data. The answer, for every in-memory tensor, is the disk tensors that hold it and where each
one sits inside it (a :class:`Piece`). No list of model names is kept here.

Operations whose index arithmetic is not implemented (see :data:`INDEX_OPS`) are recorded, and
only refused when an adapter actually targets a tensor they produce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mergeflow.errors import PlanError


@dataclass(frozen=True)
class Axis:
    """How one dimension of an in-memory tensor is indexed by a disk tensor: ``index =
    offset + stride * j`` along disk dimension ``source`` (None: the piece sits at the single
    index ``offset`` of this dimension)."""

    offset: int
    source: int | None = None
    stride: int = 1


@dataclass(frozen=True)
class Piece:
    """One disk tensor inside an in-memory tensor: ``memory[axes] == disk`` elementwise."""

    disk: str
    shape: tuple[int, ...]  # the disk tensor's shape
    axes: tuple[Axis, ...]  # one per in-memory dimension

    @property
    def identity(self) -> bool:
        """The disk tensor is the whole in-memory tensor, dimension for dimension."""
        return all(a.source == i and a.offset == 0 and a.stride == 1
                   for i, a in enumerate(self.axes)) and len(self.axes) == len(self.shape)


@dataclass
class ModelMap:
    """In-memory tensor name -> the disk pieces that hold it (identity entries omitted)."""

    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)  # memory name -> why
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # memory -> its disk claimants
    _renamed: dict[str, str] | None = field(default=None, repr=False, compare=False)
    _pieces: set[str] = field(default_factory=set, repr=False, compare=False)
    _claimed: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def disk_name(self, memory: str) -> str:
        """The disk tensor that *is* ``memory`` (renamed at most); ``memory`` itself when
        transformers renames nothing."""
        self.check_unambiguous(memory)
        pieces = self.pieces.get(memory)
        if pieces is None:
            return memory
        if len(pieces) == 1 and pieces[0].identity:
            return pieces[0].disk
        raise PlanError(f"'{memory}' is stored on disk as {len(pieces)} tensors "
                        f"({', '.join(p.disk for p in pieces[:3])}, ...), not as one")

    def memory_name(self, disk: str) -> str:
        """The in-memory name of a disk tensor that is a whole in-memory tensor (renamed at
        most); ``disk`` itself otherwise.

        Raises:
            PlanError: the checkpoint holds that in-memory tensor more than once.
        """
        renamed = self._inverse()[0]
        claimed = self._claimed.get(disk)
        if claimed is not None:
            self.check_unambiguous(claimed)
        return renamed.get(disk, disk)

    def check_unambiguous(self, memory: str) -> None:
        """Refuse an in-memory tensor that several disk tensors claim, naming them.

        Raises:
            PlanError: which tensors, and what to do.
        """
        claims = self.ambiguous.get(memory)
        if claims:
            shown = ", ".join(f"'{c}'" for c in claims[:4]) + (", ..." if len(claims) > 4 else "")
            raise PlanError(
                f"the checkpoint holds '{memory}' more than once ({shown}: the loader maps each "
                "of them to it), so which one the model uses is ambiguous; remove the duplicates "
                "so the checkpoint keeps one naming")

    def is_piece(self, disk: str) -> bool:
        """The disk tensor is one of several that transformers joins into one in-memory tensor."""
        return disk in self._inverse()[1]

    def _inverse(self) -> tuple[dict[str, str], set[str]]:
        if self._renamed is None:
            renamed, pieces = {}, set()
            for memory, found in self.pieces.items():
                if len(found) == 1 and found[0].identity:
                    renamed[found[0].disk] = memory
                else:
                    pieces.update(p.disk for p in found)
            self._renamed, self._pieces = renamed, pieces
            self._claimed = {d: m for m, claims in self.ambiguous.items() for d in claims}
        return self._renamed, self._pieces

    def pieces_of(self, memory: str, shape: tuple[int, ...]) -> list[Piece]:
        """Every disk piece of ``memory`` (of in-memory ``shape``), checked to cover it exactly
        once."""
        self.check_unambiguous(memory)
        if memory in self.unsupported:
            raise PlanError(f"'{memory}': {self.unsupported[memory]}")
        pieces = self.pieces.get(memory)
        if pieces is None:
            return [Piece(memory, shape, tuple(Axis(0, i) for i in range(len(shape))))]
        check_cover(memory, shape, pieces)
        return pieces

    def to_json(self) -> dict:
        return {"pieces": {m: [[p.disk, list(p.shape), [[a.offset, a.source, a.stride] for a in p.axes]]
                               for p in ps] for m, ps in self.pieces.items()},
                "unsupported": self.unsupported, "ambiguous": self.ambiguous}

    @classmethod
    def from_json(cls, data: dict) -> ModelMap:
        pieces = {m: [Piece(d, tuple(s), tuple(Axis(o, src, st) for o, src, st in axes))
                      for d, s, axes in ps] for m, ps in data["pieces"].items()}
        return cls(pieces=pieces, unsupported=dict(data["unsupported"]),
                   ambiguous={m: list(c) for m, c in data.get("ambiguous", {}).items()})


def check_cover(memory: str, shape: tuple[int, ...], pieces: list[Piece]) -> None:
    """Refuse unless the pieces tile ``memory`` exactly: same element count, no two pieces at the
    same place (pieces of one converter differ in a fixed index or a disjoint offset range)."""
    total = 1
    for d in shape:
        total *= d
    covered = 0
    for p in pieces:
        n = 1
        for d in p.shape:
            n *= d
        covered += n
    starts = {tuple(a.offset for a in p.axes) for p in pieces}
    if covered != total or len(starts) != len(pieces):
        raise PlanError(f"'{memory}' (shape {list(shape)}) is not covered exactly once by its "
                        f"{len(pieces)} disk tensors ({covered} of {total} elements); the "
                        "checkpoint is incomplete or has duplicates")


# -- building the map with transformers' own conversion mapping -----------------------------

INDEX_OPS = ("MergeModulelist", "Concatenate", "Transpose")


def read_model_map(model, disk_shapes: dict[str, tuple[int, ...]]) -> ModelMap:
    """Map a ``meta``-device model's tensors to the checkpoint tensors ``disk_shapes`` holds.

    Every disk name goes through the loader's own renaming and converter matching; a converter's
    group of disk tensors is then placed by replaying its operations on index maps.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    memory = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", None) or None
    groups: dict[str, dict[str, list[tuple[int, str]]]] = {}  # memory -> pattern -> [(i, disk)]
    owner: dict[str, object] = {}
    whole: dict[str, list[str]] = {}  # memory -> the disk tensors that are it whole (renamed or not)
    result = ModelMap()
    for disk in disk_shapes:
        target, pattern = rename_source_key(disk, renamings, converters, prefix, memory)
        if pattern is None:
            if target in memory:
                whole.setdefault(target, []).append(disk)
            if target != disk and target in memory:
                result.pieces[target] = [Piece(disk, disk_shapes[disk], tuple(
                    Axis(0, i) for i in range(len(disk_shapes[disk]))))]
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        owner[target] = converter
        groups.setdefault(target, {}).setdefault(pattern, []).append((_index_in(disk, pattern), disk))
    for target, by_pattern in groups.items():
        converter = owner[target]
        try:
            result.pieces[target] = _place(converter, by_pattern, disk_shapes)
        except _Unsupported as exc:
            result.unsupported[target] = (
                f"transformers converts it from {sum(len(v) for v in by_pattern.values())} disk "
                f"tensors with {exc}, which Mergeflow cannot map index by index yet")
    _mark_ambiguous(result, whole, groups)
    return result


def _mark_ambiguous(result: ModelMap, whole: dict[str, list[str]],
                    groups: dict[str, dict[str, list[tuple[int, str]]]]) -> None:
    """Record the in-memory tensors that several disk tensors claim: two names the loader
    renames to the same one, a renamed tensor next to one already under that name, or a whole
    tensor next to a converter's pieces. Such a tensor has no single place on disk."""
    for memory in set(whole) | set(groups):
        if len(whole.get(memory, [])) > 1 or (memory in whole and memory in groups):
            result.pieces.pop(memory, None)
            result.ambiguous[memory] = whole.get(memory, []) + sorted(
                d for found in groups.get(memory, {}).values() for _, d in found)


class _Unsupported(Exception):
    pass


def _index_in(disk: str, pattern: str) -> int:
    """The ``*`` (module-list index) of ``pattern`` as it matches ``disk``; 0 without one."""
    if "*" not in pattern:
        return 0
    regex = re.escape(pattern.lstrip("^").rstrip("$")).replace(r"\*", r"(\d+)")
    found = re.search(regex, disk)
    return int(found.group(1)) if found else 0


@dataclass
class _Sym:
    """A tensor during the replayed conversion: its shape and the pieces inside it."""

    shape: list[int]
    pieces: list[tuple[str, tuple[int, ...], list[Axis]]]


def _place(converter, by_pattern: dict[str, list[tuple[int, str]]],
           disk_shapes: dict[str, tuple[int, ...]]) -> list[Piece]:
    """Replay a converter's operations on index maps: which part of the target each disk tensor
    becomes. The loader orders a pattern's tensors by their module-list index."""
    state: dict[str, list[_Sym] | _Sym] = {}
    for pattern in converter.source_patterns:
        found = sorted(by_pattern.get(pattern, []))
        if not found:
            continue
        state[pattern] = [_Sym(list(disk_shapes[d]), [(d, disk_shapes[d], [
            Axis(0, i) for i in range(len(disk_shapes[d]))])]) for _, d in found]
    for op in converter.operations:
        name = type(op).__name__
        if name not in INDEX_OPS:
            raise _Unsupported(f"the operation {name}")
        state = _apply(name, op, state)
    if len(state) != 1:
        raise _Unsupported(f"{len(state)} outputs")
    (out,) = state.values()
    if isinstance(out, list):
        if len(out) != 1:
            raise _Unsupported("an unmerged module list")
        out = out[0]
    return [Piece(d, s, tuple(axes)) for d, s, axes in out.pieces]


def _apply(name: str, op, state: dict) -> dict:
    if name == "MergeModulelist":
        return {k: _stack(v, op.dim) if isinstance(v, list) else v for k, v in state.items()}
    if name == "Concatenate":
        parts: list[_Sym] = []
        for v in state.values():
            parts.extend(v if isinstance(v, list) else [v])
        return {"cat": _cat(parts, op.dim)}
    if name == "Transpose":
        if op.check_dims:
            raise _Unsupported("a shape-dependent Transpose")
        return {k: _transpose(v if not isinstance(v, list) else _single(v), op.dim0, op.dim1)
                for k, v in state.items()}
    raise _Unsupported(f"the operation {name}")


def _single(v: list[_Sym]) -> _Sym:
    if len(v) != 1:
        raise _Unsupported("a module list where one tensor was expected")
    return v[0]


def _stack(items: list[_Sym], dim: int) -> _Sym:
    """``torch.stack(items, dim)``: item ``k`` sits at index ``k`` of the new dimension."""
    first = items[0].shape
    if any(s.shape != first for s in items):
        raise _Unsupported("stacking tensors of different shapes")
    dim = dim % (len(first) + 1)
    pieces = []
    for k, item in enumerate(items):
        for d, s, axes in item.pieces:
            pieces.append((d, s, [*axes[:dim], Axis(k), *axes[dim:]]))
    return _Sym([*first[:dim], len(items), *first[dim:]], pieces)


def _cat(items: list[_Sym], dim: int) -> _Sym:
    """``torch.cat(items, dim)``: each item's pieces move by the sizes before it."""
    dim = dim % len(items[0].shape)
    offset, pieces = 0, []
    for item in items:
        for d, s, axes in item.pieces:
            moved = list(axes)
            a = moved[dim]
            moved[dim] = Axis(a.offset + offset, a.source, a.stride)
            pieces.append((d, s, moved))
        offset += item.shape[dim]
    shape = list(items[0].shape)
    shape[dim] = offset
    return _Sym(shape, pieces)


def _transpose(item: _Sym, d0: int, d1: int) -> _Sym:
    shape = list(item.shape)
    shape[d0], shape[d1] = shape[d1], shape[d0]
    pieces = []
    for d, s, axes in item.pieces:
        moved = list(axes)
        moved[d0], moved[d1] = moved[d1], moved[d0]
        pieces.append((d, s, moved))
    return _Sym(shape, pieces)


@dataclass(frozen=True)
class WrappedParam:
    """A parameter PEFT adapts whole (``target_parameters``, ``lora.ParamWrapper``), as PEFT's
    own wrapper on the meta model describes it."""

    param: str  # its in-memory name, e.g. model.layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, ...]  # in memory: (experts, d1, d2), or (d1, d2)
    experts: int
    b_left: bool  # the update of P[e] is B_e @ A_e (else (B_e @ A_e).T)
    rank: int
    scale: float


@dataclass(frozen=True)
class ExpertSlice:
    """Where one disk tensor sits in a wrapped parameter, as :func:`mergeflow.math.lora.expert_factors`
    takes it: ``expert``, ``transposed``, ``rows`` and ``cols`` (start, step, count) of one
    expert's 2-D slice. A disk tensor holding several experts (fused on disk, experts along its
    first dimension) has ``count`` of them: its expert ``k`` is the parameter's expert
    ``expert + k * stride``, each with the same rows and columns."""

    expert: int
    transposed: bool
    rows: tuple[int, int, int]
    cols: tuple[int, int, int]
    count: int | None = None  # None: a single expert's slice (a 2-D disk tensor)
    stride: int = 1


def expert_slice(piece: Piece, wrapped: WrappedParam) -> ExpertSlice:
    """Where one disk tensor sits in a wrapped parameter (see :class:`ExpertSlice`).

    Raises:
        PlanError: the disk tensor is not a 2-D slice of one expert, nor a stack of such slices
            along its first dimension.
    """
    axes = list(piece.axes)
    expert, count, stride, inner = 0, None, 1, tuple(piece.shape)
    if len(wrapped.shape) == 3:
        e_axis = axes.pop(0)
        expert = e_axis.offset
        if e_axis.source is not None:  # several experts in one disk tensor
            if e_axis.source != 0 or len(piece.shape) != 3:
                raise PlanError(f"'{piece.disk}' (shape {list(piece.shape)}) holds experts of "
                                f"'{wrapped.param}' along its dimension {e_axis.source}; "
                                "Mergeflow merges fused experts stored along the first one")
            count, stride, inner = piece.shape[0], e_axis.stride, tuple(piece.shape[1:])
            # the other dimensions index the disk tensor after its expert dimension
            axes = [Axis(a.offset, None if a.source is None else a.source - 1, a.stride)
                    for a in axes]
    if len(inner) != 2 or len(axes) != 2 or any(a.source is None for a in axes):
        raise PlanError(f"'{piece.disk}' (shape {list(piece.shape)}) is not a 2-D slice of "
                        f"'{wrapped.param}'; cannot place its LoRA update")
    d1, d2 = axes
    if d1.source == d2.source:
        raise PlanError(f"'{piece.disk}' is a diagonal of '{wrapped.param}'; cannot place it")
    transposed = d1.source == 1
    along0, along1 = (d2, d1) if transposed else (d1, d2)
    return ExpertSlice(expert=expert, transposed=transposed,
                       rows=(along0.offset, along0.stride, inner[0]),
                       cols=(along1.offset, along1.stride, inner[1]), count=count, stride=stride)
