"""Check a written merge before it is published.

Three kinds of checks, all in bounded memory (about a hundred rows at a time):

* integrity: every file listed in the manifest exists with its size and sha256, and nothing else
  is there. Shards this process has just written (or checked for resume) are trusted by the
  sha256 their writer computed while writing them; only their sizes are checked again, so no
  shard is read back just to be hashed a second time;
* completeness: the shards hold exactly the planned tensors, with the planned dtypes and shapes;
  every merged tensor's sampled rows are finite (the merge itself checked every block);
* numerics: every merged tensor acts like base + adapter. For a linear LoRA, ``W' x`` is compared
  with ``W x + s * B (A x)`` on a few random vectors (DoRA: rescaled by ``m / ||W + s B A||``);
  in a tensor holding several experts, each sampled row against its own expert's factors;
  embedding LoRA rows, trainable-token rows and ``lora_bias`` are compared directly. This uses
  matrix-vector products, a different path from the merge's own ``W + s * B @ A``. Large tensors
  are checked on a random sample of output rows, so the cost stays a read per tensor.

It also measures ``||W' - W|| / ||W||`` per merged tensor, so an exploding or empty adapter is
visible at a glance.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from pydantic import BaseModel

from mergeflow.engine.fp8 import decode_row_set
from mergeflow.engine.ops import TensorMerger
from mergeflow.engine.readers import RowView, row_reader
from mergeflow.math.numerics import all_finite
from mergeflow.model.checkpoint import Checkpoint, TensorInfo
from mergeflow.model.vocab import resize_rows
from mergeflow.output.folder import MANIFEST
from mergeflow.plan import (
    ADAPTER_FILE,
    EmbeddingLora,
    Experts,
    Fp8,
    Lora,
    LoraBias,
    MergePlan,
    Requantize,
    Resize,
    ShardPlan,
    TensorPlan,
    TokenRows,
)
from mergeflow.storage.hashing import sha256_file

# Relative error allowed in the numeric check, by output dtype (its rounding, with headroom).
# F8_E4M3: 3 mantissa bits round each value by up to 6.25% (about 3.6% in the norm)
TOLERANCE = {"BF16": 2e-2, "F16": 4e-3, "F32": 1e-4, "F64": 1e-8, "F8_E4M3": 8e-2}
PROBES = 4  # random vectors per tensor
ROWS = 128  # output rows sampled per large tensor
WINDOWS = 16  # ... in this many runs of consecutive rows (8 rows each: many places, few rows)


class TensorCheck(BaseModel):
    """The numeric check of one merged tensor."""

    name: str
    kind: str  # "LoRA", "DoRA", "embedding LoRA", "trainable tokens", "lora_bias"
    relative_error: float
    delta_norm: float  # ||W' - W|| / ||W||
    ok: bool


class VerifyReport(BaseModel):
    """What verification found. ``ok`` is False when any problem was found."""

    ok: bool
    files: int
    tensors: int
    problems: list[str] = []
    warnings: list[str] = []
    checks: list[TensorCheck] = []


def check_files(folder: Path, trusted: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Integrity: the manifest's files, sizes and sha256 against the folder.

    ``trusted`` maps file names to the sha256 this process computed while writing them: those
    files are checked by size and that hash, not read again.
    """
    trusted = trusted or {}
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return 0, [f"{folder / MANIFEST}: missing or unreadable ({exc})"]
    problems = []
    present = {p.name for p in folder.iterdir() if p.is_file()} - {MANIFEST}
    for name in sorted(present - set(listed)):
        problems.append(f"{folder / name}: not listed in the manifest")
    for name, entry in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != entry["size"] or (
                trusted[name] if name in trusted else sha256_file(path)) != entry["sha256"]:
            problems.append(f"{path}: size or sha256 differs from the manifest")
    return len(listed), problems


def _planned_outputs(plan: MergePlan) -> dict[str, tuple[str, list[int]]]:
    return {name: (dtype, list(shape)) for s in plan.shards for t in s.tensors
            for name, dtype, shape in t.outputs()}


def _written(folder: Path, plan: MergePlan) -> Checkpoint:
    """The output's weights: the model shards, or the single file of an adapter export."""
    if [s.filename for s in plan.shards] == [ADAPTER_FILE]:
        return Checkpoint(folder, weights_file=ADAPTER_FILE)
    return Checkpoint(folder)


def check_tensors(folder: Path, plan: MergePlan) -> list[str]:
    """Completeness: the written tensors are exactly the planned ones."""
    written = _written(folder, plan).tensors
    planned = _planned_outputs(plan)
    problems = [f"tensor '{n}' was planned but not written" for n in sorted(planned.keys() - written.keys())]
    problems += [f"tensor '{n}' was written but not planned" for n in sorted(written.keys() - planned.keys())]
    for name in sorted(planned.keys() & written.keys()):
        info = written[name]
        if (info.dtype, list(info.shape)) != planned[name]:
            problems.append(f"tensor '{name}' is {info.dtype}{list(info.shape)}, planned "
                            f"{planned[name][0]}{planned[name][1]}")
    return problems


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


class NumericChecker:
    """Recomputes each merged tensor's effect from the inputs and compares it with the output.

    Large tensors are checked on a random sample of ``ROWS`` stored rows (every row of a small
    one), read with positional reads, so the cost per tensor is about a hundred rows plus a few
    small products, whatever the model size; the delta norm is measured on the same rows.
    """

    def __init__(self, source: TensorMerger, seed: int = 0) -> None:
        self.source = source
        self.adapter = source.adapter
        self.gen = torch.Generator().manual_seed(seed)  # the probe vectors
        self._row_gen = torch.Generator().manual_seed(seed + 1)  # the sampled rows

    def _a(self, key: str) -> torch.Tensor:
        return self.adapter.read(key).float()

    def _rows(self, n: int) -> torch.Tensor:
        """``ROWS`` rows of ``n``: ``WINDOWS`` random runs of consecutive rows (one positional
        read each), sorted; every row when there are few."""
        if n <= ROWS:
            return torch.arange(n)
        run = ROWS // WINDOWS
        starts = torch.randperm(n // run, generator=self._row_gen)[:WINDOWS].sort().values * run
        return (starts[:, None] + torch.arange(run)[None, :]).reshape(-1)

    def sample(self, plan: TensorPlan) -> torch.Tensor | None:
        """The rows to check of a planned tensor, in its row shape (:attr:`TensorPlan.row_shape`;
        all of a small or 1-d one); None when the tensor is a plain copy or re-quantized, so
        nothing is checked numerically."""
        if not plan.computes or isinstance(plan.encoding, Requantize):
            return None
        shape = plan.row_shape
        if len(shape) < 2 or self._whole_columns(plan):
            return torch.arange(shape[0]) if shape else torch.arange(1)
        rows = self._rows(shape[0])
        tokens = plan.find(TokenRows)
        if tokens is not None:  # always look at the trained token rows too
            _, indices = self.adapter.token_deltas[tokens.module]
            rows = torch.unique(torch.cat([rows, torch.tensor(indices)]))
        return rows

    def _whole_columns(self, plan: TensorPlan) -> bool:
        """DoRA on a weight stored (in, out): its scale runs over whole columns, so every row
        is read."""
        op = plan.find(Lora)
        return op is not None and op.transposed \
            and self.adapter.modules[op.module].magnitude_key is not None

    def _input_rows(self, plan: TensorPlan, rows: torch.Tensor) -> torch.Tensor:
        """The sampled rows of the tensor a plan entry starts from, resized as planned, float32.
        The input's reader (a quantized unit's decoder) is opened once."""
        resize = plan.find(Resize)
        if self.source.is_unit(plan):
            base = self.source.read_input(plan).cpu()
            if resize is not None:
                base = resize_rows(base, resize.rows)
            return base[rows].float()
        reader, info = self.source.input_reader(plan)
        if not info.shape:
            return reader.read_rows(info.name, 0, 1).float().reshape(1)
        src_rows = info.shape[0]
        inside = rows[rows < src_rows].tolist()
        got = reader.read_row_set(info.name, inside).float()
        if len(inside) == len(rows):
            return got
        mean = self.source.mean_row(plan, reader, info).cpu()
        return torch.cat([got, mean.expand(len(rows) - len(inside), *mean.shape[1:])])

    def check(self, plan: TensorPlan, merged: torch.Tensor, rows: torch.Tensor
              ) -> TensorCheck | None:
        """Check the sampled ``rows`` (row-shape order) of one output tensor, ``merged``: the
        entry's main op (a LoRA, an embedding LoRA, ``lora_bias``) by its own check
        (:data:`_CHECKS`), trainable-token rows directly, and an entry that only resizes or
        dequantizes against its input."""
        if not plan.computes or isinstance(plan.encoding, Requantize):
            return None
        base = self._input_rows(plan, rows)
        merged = merged.float().reshape(base.shape)
        main = next((op for op in plan.ops if type(op) in _CHECKS), None)
        tokens = plan.find(TokenRows)
        if main is not None:
            kind, error, delta = _CHECKS[type(main)](self, plan, main, base, merged, rows)
        elif tokens is not None:
            kind, error, delta = "trainable tokens", self._tokens(tokens, merged, rows), float("nan")
        else:  # only resized, dequantized or FP8-encoded: against its input
            kind = "FP8 encoding" if isinstance(plan.encoding, Fp8) else "resize"
            error = _relative(merged, base)
            delta = error
        if tokens is not None and kind != "trainable tokens":
            error = max(error, self._tokens(tokens, merged, rows))
        ok = error <= TOLERANCE.get(plan.dtype, 2e-2)
        return TensorCheck(name=plan.name, kind=kind, relative_error=error, delta_norm=delta, ok=ok)

    def _linear(self, plan: TensorPlan, op: Lora, w: torch.Tensor, merged: torch.Tensor,
                rows: torch.Tensor) -> tuple[str, float, float]:
        spec = self.adapter.modules[op.module]
        a, b = self._a(spec.a_key), self._a(spec.b_key)  # (r, in), (out, r)
        scale = spec.scale
        if op.part is not None:  # one expert's slice of a whole-parameter LoRA
            a, b = op.part.factors(a, b)
            scale = op.part.scale
        if op.transposed:  # Conv1D stores (in, out); the sampled rows are inputs
            if spec.magnitude_key is None:
                x = torch.randn(w.shape[1], PROBES, generator=self.gen)  # (out, p)
                # (k, out) @ (out, p) + (k, r) @ ((r, out) @ (out, p)) -> (k, p)
                ref = w @ x + scale * (a[:, rows].T @ (b.T @ x))
                return "LoRA", _relative(merged @ x, ref), _relative(merged, w)
            w, merged = w.T, merged.T  # every row was read: back to (out, in)
            rows = torch.arange(w.shape[0])
        b = b[rows]  # (k, r)
        x = torch.randn(w.shape[1], PROBES, generator=self.gen)  # (in, p)
        ref = w @ x + scale * (b @ (a @ x))  # (k, p)
        kind = "LoRA"
        if spec.magnitude_key is not None:
            kind = "DoRA"
            norms = torch.linalg.vector_norm(w + scale * (b @ a), dim=1)  # (k,)
            ref = ref * (self._a(spec.magnitude_key)[rows] / norms)[:, None]
        return kind, _relative(merged @ x, ref), _relative(merged, w)

    def _experts(self, plan: TensorPlan, op: Experts, w: torch.Tensor, merged: torch.Tensor,
                 rows: torch.Tensor) -> tuple[str, float, float]:
        """Several experts in one tensor: sampled row ``g`` (of ``(count * n0, n1)``) is row
        ``g % n0`` of disk expert ``g // n0``, checked against that expert's own factors."""
        spec = self.adapter.modules[op.module]
        a, b = self._a(spec.a_key), self._a(spec.b_key)  # (r·E, in), (out, r·E)
        x = torch.randn(w.shape[1], PROBES, generator=self.gen)  # (n1, p)
        ref = w @ x  # (k, p)
        n0 = op.rows_per_expert
        experts = torch.div(rows, n0, rounding_mode="floor")  # (k,)
        for k in torch.unique(experts).tolist():
            picked = experts == k
            a2, b2 = op.part(k).factors(a, b)  # (r, n1), (n0, r)
            # (m, r) @ ((r, n1) @ (n1, p)) -> (m, p)
            ref[picked] += op.first.scale * (b2[rows[picked] - k * n0] @ (a2 @ x))
        return "LoRA", _relative(merged @ x, ref), _relative(merged, w)

    def _embedding(self, plan: TensorPlan, op: EmbeddingLora, w: torch.Tensor,
                   merged: torch.Tensor, rows: torch.Tensor) -> tuple[str, float, float]:
        spec = self.adapter.modules[op.module]
        a, b = self._a(spec.a_key), self._a(spec.b_key)  # (r, rows), (dim, r)
        keep = torch.ones(len(rows), dtype=torch.bool)
        tokens = plan.find(TokenRows)
        if tokens is not None:  # those rows are replaced, checked separately
            _, indices = self.adapter.token_deltas[tokens.module]
            keep = ~torch.isin(rows, torch.tensor(indices))
        if not bool(keep.any()):
            return "embedding LoRA", 0.0, 0.0
        w, got, rows = w[keep], merged[keep], rows[keep]  # (n, dim)
        ref = w + spec.scale * (a[:, rows].T @ b.T)  # (n, r) @ (r, dim) -> (n, dim)
        return "embedding LoRA", _relative(got, ref), _relative(got, w)

    def _bias(self, plan: TensorPlan, op: LoraBias, base: torch.Tensor, merged: torch.Tensor,
              rows: torch.Tensor) -> tuple[str, float, float]:
        spec = self.adapter.modules[op.module]
        ref = base + spec.scale * self._a(spec.bias_key)
        return "lora_bias", _relative(merged, ref), _relative(merged, base)

    def _tokens(self, op: TokenRows, merged: torch.Tensor, rows: torch.Tensor) -> float:
        key, indices = self.adapter.token_deltas[op.module]
        position = {int(r): i for i, r in enumerate(rows)}
        picked = [position[i] for i in indices if i in position]
        trained = self._a(key)[[n for n, i in enumerate(indices) if i in position]]
        return _relative(merged[picked], trained) if picked else 0.0


# op type -> its numeric check: (checker, plan, op, input rows, merged rows, rows) ->
# (kind, relative error, delta norm)
_CHECKS: dict[type, Callable[..., tuple[str, float, float]]] = {
    Lora: NumericChecker._linear,
    Experts: NumericChecker._experts,
    EmbeddingLora: NumericChecker._embedding,
    LoraBias: NumericChecker._bias,
}


# a sampled tensor: its plan, the rows to check, and the reader and header of its row shape
Sampled = tuple[TensorPlan, torch.Tensor, Checkpoint | RowView, TensorInfo]


def check_values(written: Checkpoint, tensors: list[TensorPlan], checker: NumericChecker
                 ) -> tuple[int, list[TensorCheck], list[str]]:
    """Finiteness and the numeric check of the given planned tensors' sampled rows, read from
    ``written``; plain copies are checked by their shard's sha256 alone."""
    checks, problems = [], []
    present = [t for t in tensors if t.name in written]
    sampled = [(t, rows, *row_reader(written, written.tensors[t.name], t.row_shape))
               for t in present if (rows := checker.sample(t)) is not None]
    _read_ahead(written, sampled)
    for tensor, rows, reader, info in sampled:
        value = reader.read_row_set(info.name, rows.tolist()) if tensor.shape \
            else reader.read_rows(info.name, 0, 1)
        if not all_finite(value):
            problems.append(f"tensor '{tensor.name}' holds NaN or Inf")
            continue
        if isinstance(tensor.encoding, Fp8):  # checked as served: the values times their scales
            value = decode_row_set(value, written.read_many([tensor.parts[0].name])
                                   [tensor.parts[0].name], tensor.encoding.scheme, rows)
        check = checker.check(tensor, value, rows)
        if check is not None:
            checks.append(check)
            if not check.ok:
                problems.append(f"tensor '{tensor.name}': {check.kind} check off by "
                                f"{check.relative_error:.2e} (relative)")
    return len(present), checks, problems


def _read_ahead(written: Checkpoint, sampled: list[Sampled]) -> None:
    """Ask the kernel for every sampled row of a shard at once (a written shard is not in the
    page cache: its writes went past it), so the disk reads them while the checks compute."""
    for _, rows, reader, info in sampled:
        if reader is written:  # stored in its row shape: the rows are the file's own
            written.will_read_rows(info.name, rows.tolist())


def _no_op_warnings(checks: list[TensorCheck]) -> list[str]:
    merged = [c for c in checks if c.kind in ("LoRA", "DoRA", "embedding LoRA")]
    if merged and all(c.delta_norm == 0 for c in merged):
        return ["the adapter changes no weight at all (every LoRA delta is zero): "
                "the output equals the base; was the adapter trained?"]
    return []


def verify_shard(folder: Path, shard: ShardPlan, source: TensorMerger) -> VerifyReport:
    """Check one freshly written shard (low-disk mode verifies each shard before shipping it)."""
    written = Checkpoint(folder, weights_file=shard.filename)
    planned = {n for t in shard.tensors for n, _, _ in t.outputs()}
    problems = [f"{shard.filename}: tensor '{n}' missing" for n in sorted(planned - set(written.tensors))]
    count, checks, more = check_values(written, shard.tensors, NumericChecker(source))
    return VerifyReport(ok=not problems and not more, files=1, tensors=count,
                        problems=problems + more, warnings=[], checks=checks)


def verify_output(folder: Path, plan: MergePlan, open_source: Callable[[], TensorMerger],
                  trusted: dict[str, str] | None = None, threads: int = 1) -> VerifyReport:
    """Run every check on a written (not yet published) output folder; ``trusted``: see
    :func:`check_files`. The numeric checks run shard by shard on up to ``threads`` threads,
    each thread with a tensor source of its own (``open_source()``, opened once) and each shard
    with a checker seeded alike, so the rows sampled never depend on the thread count."""
    files, problems = check_files(folder, trusted)
    problems += check_tensors(folder, plan)
    written = _written(folder, plan)
    local = threading.local()

    def check_shard(shard: ShardPlan) -> tuple[int, list[TensorCheck], list[str]]:
        if not hasattr(local, "source"):
            local.source = open_source()
        return check_values(written, shard.tensors, NumericChecker(local.source))

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(plan.shards))),
                            thread_name_prefix="mergeflow-verify") as pool:
        shards = list(pool.map(check_shard, plan.shards))
    count = sum(n for n, _, _ in shards)
    checks = [c for _, found, _ in shards for c in found]
    problems += [p for _, _, more in shards for p in more]
    return VerifyReport(ok=not problems, files=files, tensors=count, problems=problems,
                        warnings=_no_op_warnings(checks), checks=checks)
