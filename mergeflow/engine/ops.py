"""The merge ops, and the merger that runs them over a plan entry's rows.

Each op type of the plan (:mod:`mergeflow.plan`) has two forms here, side by side: a builder of
its in-place step on a row block (:data:`_BLOCK_STEPS`, each returning a :data:`BlockStep`), and
the same op on a whole tensor, for a quantized unit produced whole (:data:`_WHOLE_OPS`). A new op
adds one of each and an entry in both tables.

:class:`TensorMerger` yields each planned tensor's merged rows: it reads the input through
:mod:`mergeflow.engine.readers`, applies the steps block by block in float32 on its device, checks
the result for NaN/Inf and casts it to the output dtype (on CUDA, the cast block comes back to a
pinned host buffer asynchronously; the writer waits for its copy event).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from pydantic import BaseModel

from mergeflow.engine.codecs import requantize
from mergeflow.engine.fp8 import Fp8Encoder, requantizer
from mergeflow.engine.readers import (
    DEFAULT_BLOCK_BYTES,
    ROW_TILE,
    PlanInputs,
    Reader,
    RowUploader,
    ThreadBuffers,
    _numel,
    is_unit,
    rows_per_block,
)
from mergeflow.errors import AdapterError, InputError
from mergeflow.math.lora import embedding_delta, merge_bias, merge_linear
from mergeflow.math.numerics import all_finite
from mergeflow.model.adapter import Adapter
from mergeflow.model.checkpoint import DTYPES, Checkpoint, TensorInfo
from mergeflow.model.vocab import resize_rows
from mergeflow.plan import (
    Cast,
    EmbeddingLora,
    Experts,
    Fp8,
    Lora,
    LoraBias,
    LoraPart,
    QuantizedUnit,
    Requantize,
    Resize,
    Stored,
    TensorPlan,
    TokenRows,
)

# One encoded block: (CPU tensor, CUDA event to wait for or None, callback releasing its buffer)
Block = tuple[torch.Tensor, object, "Callable[[], None] | None"]
# One merge step on a row block: (work, i, j) -> None, changing rows [i, j) of ``work`` in place.
BlockStep = Callable[[torch.Tensor, int, int], None]

# Rows per step of the passes that reduce over rows (vocabulary mean, DoRA column norms): fixed,
# so the output bytes never depend on the block size.
STAT_ROWS = 256


@dataclass
class _Lora:
    """A LoRA pair as the block loop uses it, float32 on the device."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    magnitude: torch.Tensor | None  # DoRA: (out,)


class AdapterTensors:
    """The adapter's tensors as the ops take them: on the merge's device.

    Args:
        adapter: the opened adapter.
        device: the device the merge runs on.
    """

    def __init__(self, adapter: Adapter, device: torch.device) -> None:
        self.adapter = adapter
        self.device = device

    def tensor(self, key: str) -> torch.Tensor:
        """Adapter tensor ``key``, as stored, on the device."""
        return self.adapter.read(key).to(self.device)

    def lora_pair(self, op: Lora) -> _Lora:
        """Module ``op.module``'s LoRA pair as this op merges it: the whole pair, or one expert's
        slice of a whole-parameter LoRA (``op.part``); float32 on the device."""
        spec = self.adapter.modules[op.module]
        magnitude = self.tensor(spec.magnitude_key).float() if spec.magnitude_key else None
        if op.part is not None:  # one expert's slice of a whole-parameter LoRA
            a, b = self.expert_factors(op.part, *self.stacked_factors(op.module))
            return _Lora(a, b, op.part.scale, magnitude)
        a, b = self.tensor(spec.a_key).float(), self.tensor(spec.b_key).float()
        return _Lora(a, b, spec.scale, magnitude)

    def stacked_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole-parameter LoRA's stacked ``lora_A`` (r·E, in) and ``lora_B`` (out, r·E), as
        stored, on the CPU: experts are cut from these before any conversion or device copy."""
        spec = self.adapter.modules[module]
        return self.adapter.read(spec.a_key), self.adapter.read(spec.b_key)

    def expert_factors(self, part: LoraPart, a: torch.Tensor,
                       b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's factors ``(a2 (r, n1), b2 (n0, r))``, float32 on the device: sliced in the
        stored dtype first (the same bits as slicing after the cast), so only 1/E of the stacked
        factors is ever converted or moved."""
        a2, b2 = part.factors(a, b)
        return a2.to(self.device).float(), b2.to(self.device).float()


def _no_step(work: torch.Tensor, i: int, j: int) -> None:
    return None


def mean_row(reader: Reader, info: TensorInfo, device: torch.device) -> torch.Tensor:
    """New vocabulary rows: the mean of the input's rows (accumulated block by block in
    float64), in the input's dtype as transformers' mean resizing stores it, (1, dim)."""
    total = torch.zeros(info.shape[1:], dtype=torch.float64, device=device)
    for i in range(0, info.shape[0], STAT_ROWS):
        j = min(i + STAT_ROWS, info.shape[0])
        total += reader.read_rows(info.name, i, j).to(device).double().sum(dim=0)
    mean = (total / info.shape[0]).float()
    return mean.to(DTYPES[info.dtype]).float().unsqueeze(0)


# -- Resize ------------------------------------------------------------------------------------

def _resize_step(ctx: AdapterTensors, op: Resize, reader: Reader, info: TensorInfo) -> BlockStep:
    """New vocabulary rows (past the input's) get the input's mean row; a cut needs nothing
    (only the first ``op.rows`` rows are streamed)."""
    src_rows = info.shape[0]
    if op.rows <= src_rows:
        return _no_step
    mean = mean_row(reader, info, ctx.device)  # (1, dim)

    def fill(work: torch.Tensor, i: int, j: int) -> None:
        k = max(0, min(j, src_rows) - i)
        if k < j - i:
            work[k:].copy_(mean.expand(j - i - k, *mean.shape[1:]))
    return fill


def _whole_resize(ctx: AdapterTensors, op: Resize, tensor: torch.Tensor) -> torch.Tensor:
    return resize_rows(tensor, op.rows)


# -- Lora (and DoRA) ---------------------------------------------------------------------------

def _lora_step(ctx: AdapterTensors, op: Lora, reader: Reader, info: TensorInfo) -> BlockStep:
    lora = ctx.lora_pair(op)
    col_scale = _dora_column_scale(reader, info, lora, ctx.device) \
        if lora.magnitude is not None and op.transposed else None

    def merge(work: torch.Tensor, i: int, j: int) -> None:
        _merge_block(work, lora, i, j, op.transposed, col_scale)
    return merge


def _whole_lora(ctx: AdapterTensors, op: Lora, tensor: torch.Tensor) -> torch.Tensor:
    lora = ctx.lora_pair(op)
    return merge_linear(tensor, lora.a, lora.b, lora.scale, fan_in_fan_out=op.transposed,
                        magnitude=lora.magnitude)


def _merge_block(work: torch.Tensor, lora: _Lora, i: int, j: int, transposed: bool,
                 col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Merge rows ``[i, j)`` of a stored weight in place and return it.

    Stored ``(out, in)``: ``W[i:j] += s * B[i:j] @ A``, then DoRA rescales each row.
    Stored ``(in, out)`` (Conv1D): ``W[i:j] += s * A[:, i:j].T @ B.T``; DoRA's per-output
    scale (over whole columns) was measured by a first pass, ``col_scale``.
    """
    for t in range(i, j, ROW_TILE):  # rows [t, u) of the stored weight, at work[t-i:u-i]
        u = min(t + ROW_TILE, j)
        if transposed:  # (n, r) @ (r, out) -> (n, out)
            work[t - i:u - i].addmm_(lora.a[:, t:u].T, lora.b.T, alpha=lora.scale)
        else:  # (n, r) @ (r, in) -> (n, in)
            work[t - i:u - i].addmm_(lora.b[t:u], lora.a, alpha=lora.scale)
    if transposed:
        if col_scale is not None:
            work.mul_(col_scale[None, :])  # (k, out) * (1, out)
        return work
    if lora.magnitude is not None:
        norms = torch.linalg.vector_norm(work, dim=1)  # (k,)
        work.mul_((lora.magnitude[i:j] / norms)[:, None])  # (k, in) * (k, 1)
    return work


def _dora_column_scale(reader: Reader, info: TensorInfo, lora: _Lora,
                       device: torch.device) -> torch.Tensor:
    """DoRA on a Conv1D weight stored ``(in, out)``: the row norms of the merged
    ``(out, in)`` weight are column norms here, so a first pass over the blocks sums their
    squares; returns ``m / ||W + dW||`` per output, (out,)."""
    plain = _Lora(lora.a, lora.b, lora.scale, None)
    squares = torch.zeros(info.shape[1], dtype=torch.float64, device=device)
    for i in range(0, info.shape[0], STAT_ROWS):
        j = min(i + STAT_ROWS, info.shape[0])
        work = reader.read_rows(info.name, i, j).to(device).float()
        _merge_block(work, plain, i, j, True)
        squares += work.double().square().sum(dim=0)  # (out,)
    return lora.magnitude / squares.sqrt().float()


# -- Experts (several experts in one disk tensor) ----------------------------------------------

def _experts_step(ctx: AdapterTensors, op: Experts, reader: Reader, info: TensorInfo) -> BlockStep:
    """Rows of a tensor holding several experts: each expert's rows get that expert's update
    only, with its own factors (one expert's factors alive at a time)."""
    a, b = ctx.stacked_factors(op.module)
    current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the last expert's factors

    def factors(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k not in current:
            current.clear()
            current[k] = ctx.expert_factors(op.part(k), a, b)  # (r, n1), (n0, r)
        return current[k]

    def merge(work: torch.Tensor, i: int, j: int) -> None:
        merge_experts(work, op, factors, i, j)
    return merge


def _whole_experts(ctx: AdapterTensors, op: Experts, tensor: torch.Tensor) -> torch.Tensor:
    a, b = ctx.stacked_factors(op.module)
    work = tensor.float().clone()  # (count * n0, n1)
    merge_experts(work, op, lambda k: ctx.expert_factors(op.part(k), a, b), 0, work.shape[0])
    return work


def merge_experts(work: torch.Tensor, op: Experts,
                  factors: Callable[[int], tuple[torch.Tensor, torch.Tensor]], i: int, j: int
                  ) -> torch.Tensor:
    """Merge rows ``[i, j)`` of a tensor holding several experts, streamed as
    ``(count * n0, n1)`` (``work`` holds those rows), in place: row ``g`` is row ``g % n0`` of
    disk expert ``g // n0``, and gets ``scale * b2[g % n0] @ a2`` with that expert's factors
    (``factors(k)`` -> ``(a2 (r, n1), b2 (n0, r))``). GEMM tiles sit at fixed positions (whole
    :data:`ROW_TILE` runs from each expert's first row), so the bits never depend on the block
    size."""
    n0, scale = op.rows_per_expert, op.first.scale
    for k in range(i // n0, -(-j // n0)):  # the disk experts whose rows meet [i, j)
        first = k * n0
        lo, hi = max(i, first), min(j, first + n0)
        if lo >= hi:
            continue
        a2, b2 = factors(k)
        t = lo
        while t < hi:
            u = min(hi, first + ((t - first) // ROW_TILE + 1) * ROW_TILE)
            # (n, r) @ (r, n1) -> (n, n1): rows [t, u) of expert k's update
            work[t - i:u - i].addmm_(b2[t - first:u - first], a2, alpha=scale)
            t = u
    return work


# -- EmbeddingLora -----------------------------------------------------------------------------

def _embedding_lora_step(ctx: AdapterTensors, op: EmbeddingLora, reader: Reader,
                         info: TensorInfo) -> BlockStep:
    spec = ctx.adapter.modules[op.module]
    a = ctx.tensor(spec.a_key).float()  # (r, rows)
    b = ctx.tensor(spec.b_key).float()  # (dim, r)

    def add(work: torch.Tensor, i: int, j: int) -> None:
        for t in range(i, j, ROW_TILE):
            u = min(t + ROW_TILE, j)
            # (n, r) @ (r, dim) -> (n, dim): rows [t, u) of (B @ A).T, as the table lays out
            delta = torch.mm(a[:, t:u].T, b.T)
            delta.mul_(spec.scale)
            work[t - i:u - i].add_(delta)
    return add


def _whole_embedding_lora(ctx: AdapterTensors, op: EmbeddingLora,
                          tensor: torch.Tensor) -> torch.Tensor:
    spec = ctx.adapter.modules[op.module]
    delta = embedding_delta(ctx.tensor(spec.a_key), ctx.tensor(spec.b_key), spec.scale)
    return tensor.float() + delta  # (rows, dim)


# -- LoraBias ----------------------------------------------------------------------------------

def _lora_bias_step(ctx: AdapterTensors, op: LoraBias, reader: Reader,
                    info: TensorInfo) -> BlockStep:
    """``s * lora_B.bias``, added to the (1-D) bias as one block."""
    spec = ctx.adapter.modules[op.module]
    bias = ctx.tensor(spec.bias_key).float() * spec.scale  # (out,)

    def add(work: torch.Tensor, i: int, j: int) -> None:
        work.add_(bias)
    return add


def _whole_lora_bias(ctx: AdapterTensors, op: LoraBias, tensor: torch.Tensor) -> torch.Tensor:
    spec = ctx.adapter.modules[op.module]
    return merge_bias(tensor, ctx.tensor(spec.bias_key), spec.scale)


# -- TokenRows (trainable tokens) --------------------------------------------------------------

def _token_rows_step(ctx: AdapterTensors, op: TokenRows, reader: Reader,
                     info: TensorInfo) -> BlockStep:
    """Trainable tokens: their rows overwritten by the trained values."""
    key, indices = ctx.adapter.token_deltas[op.module]
    tokens = (torch.tensor(indices, device=ctx.device), ctx.tensor(key).float())

    def overwrite(work: torch.Tensor, i: int, j: int) -> None:
        _set_token_rows(work, tokens, i, j)
    return overwrite


def _whole_token_rows(ctx: AdapterTensors, op: TokenRows, tensor: torch.Tensor) -> torch.Tensor:
    key, indices = ctx.adapter.token_deltas[op.module]
    tensor = tensor.float().clone()
    tensor[torch.tensor(indices, device=ctx.device)] = ctx.tensor(key).float()
    return tensor


def _set_token_rows(work: torch.Tensor, tokens: tuple[torch.Tensor, torch.Tensor],
                    i: int, j: int) -> None:
    indices, values = tokens
    inside = (indices >= i) & (indices < j)
    if bool(inside.any()):
        work[indices[inside] - i] = values[inside]


# op type -> the builder of its step on row blocks
_BLOCK_STEPS: dict[type, Callable[[AdapterTensors, BaseModel, Reader, TensorInfo], BlockStep]] = {
    Resize: _resize_step,
    Lora: _lora_step,
    Experts: _experts_step,
    EmbeddingLora: _embedding_lora_step,
    LoraBias: _lora_bias_step,
    TokenRows: _token_rows_step,
}
# op type -> the op on a whole tensor
_WHOLE_OPS: dict[type, Callable[[AdapterTensors, BaseModel, torch.Tensor], torch.Tensor]] = {
    Resize: _whole_resize,
    Lora: _whole_lora,
    Experts: _whole_experts,
    EmbeddingLora: _whole_embedding_lora,
    LoraBias: _whole_lora_bias,
    TokenRows: _whole_token_rows,
}


def require_finite(plan: TensorPlan, tensor: torch.Tensor) -> None:
    """Fail the group when a merged tensor holds NaN or Inf, naming it."""
    if not all_finite(tensor):
        raise AdapterError(
            f"merged tensor '{plan.name}' holds NaN or Inf as {plan.dtype}: the merged values "
            "exceed the output dtype's range, or the adapter weights are not finite. Check the "
            "training run, or choose a wider `dtype` (bfloat16 or float32)")


class TensorMerger:
    """Yields the merged rows of each planned tensor, from the base and the adapter (and, for
    ``merge_onto=original``, the original 16-bit checkpoint), on one device: dequantizing,
    merging and re-quantizing all run there.

    A plan entry is produced in three stages, each looked up once by type: its ``source`` (which
    reader, :class:`mergeflow.engine.readers.PlanInputs`), its ``ops`` (one :data:`BlockStep` per
    op, built by :data:`_BLOCK_STEPS`, or one whole-tensor function per op, :data:`_WHOLE_OPS`),
    and its ``encoding`` (cast, re-quantize, or copy the stored unit;
    :func:`mergeflow.engine.shards.write_tensor`).

    Args:
        block_bytes: float32 bytes of one row block (at least one row is always taken).
    """

    def __init__(self, base: Checkpoint, adapter: Adapter, device: str = "cpu",
                 original: Checkpoint | None = None,
                 block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"`device={device}`: this machine has no usable CUDA device "
                             "(torch.cuda.is_available() is False); run with `device=cpu`")
        self.base = base
        self.adapter = adapter
        self.device = torch.device(device)
        self.original = original
        self.block_bytes = max(1, int(block_bytes))
        self.inputs = PlanInputs(base, adapter, self.device, original)
        self.buffers = ThreadBuffers(self.block_bytes)
        self.factors = AdapterTensors(adapter, self.device)

    # -- reading, through the readers ------------------------------------------------------

    is_unit = staticmethod(is_unit)

    def input_reader(self, plan: TensorPlan) -> tuple[Reader, TensorInfo]:
        """The reader of a plan entry's input and its header (:meth:`PlanInputs.input_reader`)."""
        return self.inputs.input_reader(plan)

    def stored_bytes(self, plan: TensorPlan) -> tuple[Checkpoint, TensorInfo] | None:
        """The input whose bytes are this entry's output, or None (:meth:`PlanInputs.stored_bytes`)."""
        return self.inputs.stored_bytes(plan)

    def read_rows(self, plan: TensorPlan, start: int, stop: int,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of a plan entry's input, as stored (CPU)."""
        return self.inputs.read_rows(plan, start, stop, scratch)

    def read_input(self, plan: TensorPlan) -> torch.Tensor:
        """The whole input of a plan entry, before any op (:meth:`PlanInputs.read_input`)."""
        return self.inputs.read_input(plan)

    def rows_per_block(self, plan: TensorPlan, row_elems: int) -> int:
        """Rows per block of this merger's ``block_bytes`` (:func:`readers.rows_per_block`)."""
        return rows_per_block(self.block_bytes, plan, row_elems)

    # -- the ops' inputs, for verification -------------------------------------------------

    def lora_pair(self, op: Lora) -> _Lora:
        """Module ``op.module``'s LoRA pair as this op merges it, float32 on the device."""
        return self.factors.lora_pair(op)

    def mean_row(self, plan: TensorPlan | None, reader: Reader, info: TensorInfo) -> torch.Tensor:
        """The input's mean row, as new vocabulary rows get it, (1, dim) (:func:`mean_row`)."""
        return mean_row(reader, info, self.device)

    # -- producing tensors ------------------------------------------------------------------

    def produce_all(self, plan: TensorPlan) -> list[tuple[str, torch.Tensor]]:
        """Every ``(name, tensor)`` one plan entry writes, in :meth:`TensorPlan.outputs` order,
        whole (CPU). The writer streams :meth:`blocks` instead; this is for quantized units,
        small tensors and tests."""
        if isinstance(plan.encoding, Requantize) and plan.encoding.unit.method == "fp8":
            return self._fp8_whole(plan)
        if isinstance(plan.encoding, Requantize):
            merged = self._compute_whole(plan)  # float32, on the device
            require_finite(plan, merged)
            return list(requantize(plan.encoding.unit, merged).items())
        if isinstance(plan.encoding, Fp8):
            return self._fp8_whole(plan)
        if isinstance(plan.encoding, Stored):  # an unchanged quantized unit, copied as stored
            return list(self.base.read_many([name for name, _, _ in plan.outputs()]).items())
        if isinstance(plan.source, QuantizedUnit):
            out = self._compute_whole(plan).to(DTYPES[plan.dtype])
            require_finite(plan, out)
            return [(plan.name, out.cpu().reshape(plan.shape))]
        blocks = []
        for block, _, release in self.blocks(plan):
            blocks.append(block.clone())
            if release is not None:
                release()
        tensor = torch.cat(blocks) if plan.shape else blocks[0]
        return [(plan.name, tensor.reshape(plan.shape))]

    def _fp8_whole(self, plan: TensorPlan) -> list[tuple[str, torch.Tensor]]:
        """An FP8-encoded entry (save_method fp8, or merged_4bit on an FP8 base), whole: its
        float8 values, then its scale (CPU)."""
        if isinstance(plan.encoding, Fp8):
            encoder = Fp8Encoder.for_scheme(plan.name, plan.shape, plan.encoding.scheme,
                                            plan.encoding.dtype, self.device)
        else:
            encoder = requantizer(plan.encoding.unit, plan.parts[0].dtype, self.device)
        logical = plan.model_copy(update={"dtype": "F32", "parts": [], "encoding": Cast()})
        rows, cols = plan.shape
        blocks = [encoder.encode(i, j, work.clone()) for i, j, work in
                  self.merged_rows(logical, rows, cols, rows)]
        return [(plan.name, torch.cat(blocks)), *encoder.siblings().items()]

    def _compute_whole(self, plan: TensorPlan) -> torch.Tensor:
        """A quantized unit, whole: its input, then each op in order (:data:`_WHOLE_OPS`);
        float32 (or the source dtype) on the device, in the entry's row shape."""
        tensor = self.read_input(plan).to(self.device)
        for op in plan.ops:
            tensor = _WHOLE_OPS[type(op)](self.factors, op, tensor)
        return tensor

    def blocks(self, plan: TensorPlan) -> Iterator[Block]:
        """The output of a (non-quantized) plan entry as consecutive row blocks in the planned
        dtype: ``(block, ready, release)``, where ``block`` is a CPU tensor, ``ready`` a CUDA
        event the block's device-to-host copy completes at (None on the CPU) and ``release``
        gives a pooled buffer back once the block is written (None when it is not pooled)."""
        out_dtype = DTYPES[plan.dtype]
        shape = plan.row_shape
        if not shape:  # a 0-d tensor: one "row"
            value = self.read_rows(plan, 0, 1).to(out_dtype)
            yield value.reshape(()), None, None
            return
        rows, row_elems = shape[0], _numel(shape[1:])
        step = self.rows_per_block(plan, row_elems)
        if not plan.computes:
            for i in range(0, rows, step):
                yield self.read_rows(plan, i, min(i + step, rows)).to(out_dtype), None, None
            return
        yield from self._merged_blocks(plan, rows, row_elems, step, out_dtype)

    def _merged_blocks(self, plan: TensorPlan, rows: int, row_elems: int, step: int,
                       out_dtype: torch.dtype) -> Iterator[Block]:
        """Merged row blocks, checked and cast to ``out_dtype`` (see :meth:`blocks`)."""
        cuda = self.device.type == "cuda"
        for _, _, work in self.merged_rows(plan, rows, row_elems, step):
            if cuda:
                out = work.to(out_dtype)
                require_finite(plan, out)  # after the cast: an overflow to Inf counts
                host = torch.empty(out.shape, dtype=out_dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                yield host, ready, None
            else:
                out, release = self.buffers.pool(out_dtype.itemsize).take(work.shape, out_dtype)
                out.copy_(work)  # cast into a reused buffer; the writer gives it back
                try:  # checked as cast (half the bytes of ``work`` for 16-bit outputs)
                    require_finite(plan, out)
                except AdapterError:
                    release()
                    raise
                yield out, None, release

    def merged_rows(self, plan: TensorPlan, rows: int, row_elems: int, step: int
                    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(i, j, work)``: rows ``[i, j)`` of the merged tensor (in its row shape), float32 on
        the device, in a reused buffer (valid until the next block is asked for). Rows past the
        input's (a vocabulary grown by :class:`Resize`) are filled by that op's step."""
        reader, info = self.input_reader(plan)
        uploader = RowUploader(reader, info, row_elems, self.buffers, self.device)
        steps = [_BLOCK_STEPS[type(op)](self.factors, op, reader, info) for op in plan.ops]
        for i, j, work in uploader.blocks(plan.row_shape[1:], row_elems, rows, step):
            for apply in steps:
                apply(work, i, j)
            yield i, j, work
