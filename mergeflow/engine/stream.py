"""Run one shard of a plan: stream every output tensor into the shard file in row blocks.

No code path here holds a whole tensor of a dense base. Each planned tensor is one of:

* **stored bytes** - unchanged and already in the output dtype (norms, untouched layers): its
  bytes are copied from the input file into the shard in chunks, never decoded;
* **row blocks** - everything else: rows ``[i, j)`` are read with a positional read into a
  reused buffer, turned into float32 in a reused working buffer, merged in place (linear LoRA,
  DoRA, embedding LoRA, ``lora_bias``, trainable-token rows, new vocabulary rows; in a tensor
  holding several experts, streamed as its experts' rows, each expert's own LoRA), checked for
  NaN/Inf, cast to the output dtype and handed to the shard writer, whose thread writes and
  hashes it while the next block is merged;
* **a quantized unit** - a bitsandbytes weight and its siblings, dequantized, merged and
  re-quantized whole (4-bit storage is a quarter of the 16-bit size; see ``docs/benchmarks.md``).

Memory per worker is therefore about ``block_bytes`` of float32 work plus the writer's queue of
encoded blocks, whatever the model's width. On CUDA the blocks go host-to-device from pinned
buffers, are merged on the device in float32, and come back asynchronously: the writer thread
waits for each block's copy event, so the next block is read while the last one travels.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from mergeflow.engine.writer import ShardWriter
from mergeflow.errors import AdapterError, InputError, MergeError
from mergeflow.math.lora import embedding_delta, merge_bias, merge_linear
from mergeflow.math.numerics import all_finite, fits
from mergeflow.model.adapter import Adapter
from mergeflow.model.checkpoint import DTYPES, Checkpoint, TensorInfo, row_runs
from mergeflow.model.quant import RowDequantizer, RowRequantizer, dequantize, output_keys, requantize
from mergeflow.model.vocab import resize_rows
from mergeflow.plan import (
    AdapterTensor,
    BaseTensor,
    Cast,
    EmbeddingLora,
    Experts,
    Lora,
    LoraBias,
    LoraPart,
    MergePlan,
    OriginalTensor,
    QuantizedUnit,
    Requantize,
    Resize,
    ShardPlan,
    Stored,
    TensorPlan,
    TokenRows,
)

Progress = Callable[[TensorPlan], None]
# One encoded block: (CPU tensor, CUDA event to wait for or None, callback releasing its buffer)
Block = tuple[torch.Tensor, object, "Callable[[], None] | None"]

DEFAULT_BLOCK_BYTES = 24 * 2**20  # float32 working bytes per block (the --block-size default)
COPY_CHUNK = 8 * 2**20  # pass-through copies move this many bytes at a time
# Rows per step of the passes that reduce over rows (vocabulary mean, DoRA column norms): fixed,
# so the output bytes never depend on the block size.
STAT_ROWS = 256
# GEMMs run on tiles of this many rows at fixed positions (multiples of it from row 0), so the
# kernel path - and so every last bit - never depends on the block size; blocks are whole tiles.
ROW_TILE = 64


class ShardResult(BaseModel):
    """A finished shard file: its name, size and sha256."""

    filename: str
    size: int
    sha256: str
    resumed: bool = False  # found finished by an earlier run, not written by this one


@dataclass
class _Lora:
    """A LoRA pair as the block loop uses it, float32 on the device."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    magnitude: torch.Tensor | None  # DoRA: (out,)


class _BufferPool:
    """Reusable host buffers for encoded blocks: a block is taken, filled, handed to the shard
    writer and given back by the writer thread once written. Reuse spares the page faults of a
    fresh allocation per block; the pool's size bounds the blocks in flight."""

    def __init__(self, capacity: int, count: int = 3) -> None:
        self.capacity = capacity
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._spare = count  # buffers not allocated yet (allocated on first need)

    def _get(self) -> torch.Tensor:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            if self._spare > 0:
                self._spare -= 1
                return torch.empty(self.capacity, dtype=torch.uint8)
            return self._free.get()

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, Callable[[], None]]:
        """A buffer viewed as ``dtype[shape]``, and the callback that gives it back."""
        raw = self._get()
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if nbytes > self.capacity:  # a single row wider than the block budget
            self._free.put(raw)
            return torch.empty(tuple(shape), dtype=dtype), _noop
        return raw[:nbytes].view(dtype).view(tuple(shape)), lambda: self._free.put(raw)


def _noop() -> None:
    return None


class _Pickled:
    """Row reads from a legacy ``adapter_model.bin`` adapter (already in memory, whole)."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def read_rows(self, name: str, start: int, stop: int,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self.adapter.read(name)
        return tensor[start:stop] if tensor.dim() else tensor

    def read_row_set(self, name: str, rows: list[int]) -> torch.Tensor:
        return self.adapter.read(name)[rows]


# One merge step on a row block: (work, i, j) -> None, changing rows [i, j) of ``work`` in place.
BlockStep = Callable[[torch.Tensor, int, int], None]


class RowView:
    """A stored tensor read in another row shape (its bytes unchanged): a tensor holding several
    experts, ``(count, n0, n1)``, read as the rows of its experts one after the other,
    ``(count * n0, n1)``, so a row block never has to hold a whole expert.

    Args:
        checkpoint: the checkpoint holding the tensor.
        info: the tensor's header, as stored.
        shape: the row shape to read it in (the same number of elements).
    """

    def __init__(self, checkpoint: Checkpoint, info: TensorInfo, shape: Sequence[int]) -> None:
        self.checkpoint = checkpoint
        self.stored = info
        self.info = TensorInfo(info.name, info.file, tuple(shape), info.dtype, info.offset)

    def read_rows(self, name: str, start: int, stop: int,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of the row shape, in the stored dtype (CPU); ``scratch`` as
        :meth:`mergeflow.model.checkpoint.Checkpoint.read_rows` takes it."""
        shape = self.info.shape
        row = self.info.nbytes // shape[0] if shape[0] else 0
        nbytes = (stop - start) * row
        if scratch is None or scratch.numel() < nbytes:
            scratch = torch.empty(nbytes, dtype=torch.uint8)
        raw = scratch[:nbytes]
        if nbytes:
            self.checkpoint.pread(self.stored, start * row, memoryview(raw.numpy()))
        return raw.view(DTYPES[self.info.dtype]).reshape(stop - start, *shape[1:])

    def read_row_set(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        """The given rows of the row shape, stacked, in the stored dtype; one read per run."""
        parts = [self.read_rows(name, a, b) for a, b in row_runs(rows)]
        if not parts:
            return torch.empty((0, *self.info.shape[1:]), dtype=DTYPES[self.info.dtype])
        return torch.cat(parts)


class _Reshaped:
    """A tensor held whole in memory (a legacy ``.bin`` adapter's), read in another row shape."""

    def __init__(self, reader: _Pickled, info: TensorInfo, shape: Sequence[int]) -> None:
        self.tensor = reader.adapter.read(info.name).reshape(tuple(shape))
        self.info = TensorInfo(info.name, info.file, tuple(shape), info.dtype, info.offset)

    def read_rows(self, name: str, start: int, stop: int,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        return self.tensor[start:stop]

    def read_row_set(self, name: str, rows: list[int]) -> torch.Tensor:
        return self.tensor[rows]


# What a plan entry's input is read through, row block by row block
Reader = Checkpoint | _Pickled | RowDequantizer | RowView | _Reshaped


def row_reader(reader: Checkpoint, info: TensorInfo, shape: Sequence[int]
               ) -> tuple[Checkpoint | RowView, TensorInfo]:
    """A reader of tensor ``info`` in the row shape ``shape`` (itself when it is stored so)."""
    if list(info.shape) == list(shape):
        return reader, info
    view = RowView(reader, info, shape)
    return view, view.info


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class TensorSource:
    """Produces output tensors for a plan from the base and the adapter (and, for
    ``merge_onto=original``, the original 16-bit checkpoint), on one device: dequantizing,
    merging and re-quantizing all run there.

    A plan entry is produced in three stages, each looked up once by type: its ``source`` (which
    reader), its ``ops`` (one :data:`BlockStep` per op, built by :data:`_BLOCK_STEPS`, or one
    whole-tensor function per op, :data:`_WHOLE_OPS`), and its ``encoding`` (cast, re-quantize,
    or copy the stored unit; :func:`write_tensor`).

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
        self._local = threading.local()  # per-thread reusable buffers

    # -- where a plan entry's input lives ---------------------------------------------------

    def input_reader(self, plan: TensorPlan) -> tuple[Reader, TensorInfo]:
        """The reader holding a plan entry's input tensor, and that tensor's header, in the
        entry's row shape (:attr:`TensorPlan.row_shape`; for a quantized unit decoded by rows:
        its decoded float32 view)."""
        reader, info = _SOURCE_READERS[type(plan.source)](self, plan.source)
        shape = plan.row_shape
        if plan.find(Experts) is None or list(info.shape) == list(shape):
            return reader, info
        if isinstance(reader, Checkpoint):
            return row_reader(reader, info, shape)
        if isinstance(reader, _Pickled):
            view = _Reshaped(reader, info, shape)
            return view, view.info
        return reader, info

    def _base_input(self, source: BaseTensor) -> tuple[Checkpoint, TensorInfo]:
        return self.base, self.base.tensors[source.name]

    def _adapter_input(self, source: AdapterTensor) -> tuple[Checkpoint | _Pickled, TensorInfo]:
        reader = self.adapter._reader or _Pickled(self.adapter)
        return reader, self.adapter.weights[source.name]

    def _original_input(self, source: OriginalTensor) -> tuple[Checkpoint, TensorInfo]:
        if self.original is None:
            raise MergeError(f"'{source.name}' is planned from the original checkpoint, but "
                             "none was opened (a planning bug; please report it)")
        return self.original, self.original.tensors[source.name]

    def _quantized_input(self, source: QuantizedUnit) -> tuple[RowDequantizer, TensorInfo]:
        spec = source.unit
        info = self.base.tensors[spec.weight]
        return (RowDequantizer(spec, self.base, self.device),
                TensorInfo(spec.weight, info.file, tuple(spec.shape), "F32"))

    @staticmethod
    def is_unit(plan: TensorPlan) -> bool:
        """True for a quantized unit produced whole (with its siblings, or re-quantized, or one
        whose rows do not decode on their own); a dequantized unit otherwise streams by rows."""
        if not isinstance(plan.encoding, Cast):
            return True
        return isinstance(plan.source, QuantizedUnit) and (
            plan.find(Resize) is not None or not RowDequantizer.streams(plan.source.unit))

    def stored_bytes(self, plan: TensorPlan) -> tuple[Checkpoint, TensorInfo] | None:
        """The input whose bytes are exactly this entry's output (copied, never decoded), or
        None when the entry must be computed or cast."""
        if plan.computes or self.is_unit(plan):
            return None
        reader, info = self.input_reader(plan)
        if info.dtype != plan.dtype or info.offset < 0 or not isinstance(reader, Checkpoint):
            return None
        return reader, info

    def read_rows(self, plan: TensorPlan, start: int, stop: int,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of a plan entry's input, as stored (CPU)."""
        reader, info = self.input_reader(plan)
        return reader.read_rows(info.name, start, stop, scratch)

    def read_input(self, plan: TensorPlan) -> torch.Tensor:
        """The whole tensor a plan entry starts from, before any merge step (a quantized unit
        dequantized, float32, on the device), in the entry's row shape. For small tensors and
        tests; merging streams."""
        if isinstance(plan.source, QuantizedUnit):
            unit = plan.source.unit
            stored = self.base.read_many(output_keys(unit))
            return dequantize(unit, stored, self.device)  # float32, (out, in)
        reader, info = self.input_reader(plan)
        return reader.read_rows(info.name, 0, info.shape[0]) if info.shape else \
            reader.read_rows(info.name, 0, 1)

    # -- buffers ----------------------------------------------------------------------------

    def _buffer(self, kind: str, numel: int, dtype: torch.dtype, device: torch.device,
                pinned: bool = False) -> torch.Tensor:
        """A per-thread buffer of at least ``numel`` elements, reused across blocks and tensors."""
        key = (kind, dtype, device.type, pinned)
        cache = self._local.__dict__.setdefault("buffers", {})
        buf = cache.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device, pin_memory=pinned)
            cache[key] = buf
        return buf[:numel]

    def _pool(self, itemsize: int) -> _BufferPool:
        """This thread's pool of buffers for blocks encoded ``itemsize`` bytes per value (a
        block holds at most ``block_bytes`` of float32, so ``block_bytes * itemsize / 4``)."""
        pools = self._local.__dict__.setdefault("pools", {})
        pool = pools.get(itemsize)
        if pool is None:
            # 3 blocks in flight for 16-bit outputs, 2 for float32: at most 2 blocks' bytes,
            # so a worker holds work + read + encoded <= 4 blocks (mergeflow.pipeline.resources)
            pool = pools[itemsize] = _BufferPool(max(1, self.block_bytes * itemsize // 4),
                                                 count=3 if itemsize <= 2 else 2)
        return pool

    def rows_per_block(self, plan: TensorPlan, row_elems: int) -> int:
        """Rows per block: as many float32 rows as ``block_bytes`` holds, then evened out over
        the tensor so that no block is a sliver (a 1-row GEMM takes another kernel path)."""
        shape = plan.row_shape
        rows = shape[0] if shape else 1
        # whole tiles that fit the budget (at least one), then evened out over the tensor
        per_block = max(1, self.block_bytes // max(1, 4 * row_elems * ROW_TILE))
        tiles = -(-rows // ROW_TILE)
        blocks = -(-tiles // per_block)
        return -(-tiles // blocks) * ROW_TILE

    # -- producing tensors ------------------------------------------------------------------

    def produce_all(self, plan: TensorPlan) -> list[tuple[str, torch.Tensor]]:
        """Every ``(name, tensor)`` one plan entry writes, in :meth:`TensorPlan.outputs` order,
        whole (CPU). The writer streams :meth:`blocks` instead; this is for quantized units,
        small tensors and tests."""
        if isinstance(plan.encoding, Requantize):
            merged = self._compute_whole(plan)  # float32, on the device
            _require_finite(plan, merged)
            return list(requantize(plan.encoding.unit, merged).items())
        if isinstance(plan.encoding, Stored):  # an unchanged quantized unit, copied as stored
            return list(self.base.read_many([name for name, _, _ in plan.outputs()]).items())
        if isinstance(plan.source, QuantizedUnit):
            out = self._compute_whole(plan).to(DTYPES[plan.dtype])
            _require_finite(plan, out)
            return [(plan.name, out.cpu().reshape(plan.shape))]
        blocks = []
        for block, _, release in self.blocks(plan):
            blocks.append(block.clone())
            if release is not None:
                release()
        tensor = torch.cat(blocks) if plan.shape else blocks[0]
        return [(plan.name, tensor.reshape(plan.shape))]

    def _compute_whole(self, plan: TensorPlan) -> torch.Tensor:
        """A quantized unit, whole: its input, then each op in order (:data:`_WHOLE_OPS`);
        float32 (or the source dtype) on the device, in the entry's row shape."""
        tensor = self.read_input(plan).to(self.device)
        for op in plan.ops:
            tensor = _WHOLE_OPS[type(op)](self, op, tensor)
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
            if not fits(work, out_dtype):  # one pass: no NaN/Inf, and the cast cannot overflow
                _require_finite(plan, work.to(out_dtype))  # after the cast: overflow counts
            if cuda:
                out = work.to(out_dtype)
                host = torch.empty(out.shape, dtype=out_dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                yield host, ready, None
            else:
                out, release = self._pool(out_dtype.itemsize).take(work.shape, out_dtype)
                out.copy_(work)  # cast into a reused buffer; the writer gives it back
                yield out, None, release

    def merged_rows(self, plan: TensorPlan, rows: int, row_elems: int, step: int
                    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(i, j, work)``: rows ``[i, j)`` of the merged tensor (in its row shape), float32 on
        the device, in a reused buffer (valid until the next block is asked for). Rows past the
        input's (a vocabulary grown by :class:`Resize`) are filled by that op's step."""
        reader, info = self.input_reader(plan)
        src_rows = info.shape[0]
        src_dtype = DTYPES[info.dtype]
        cuda = self.device.type == "cuda"
        steps = [_BLOCK_STEPS[type(op)](self, op, reader, info) for op in plan.ops]
        row_shape = plan.row_shape[1:]
        row_bytes = row_elems * src_dtype.itemsize
        uploads: list[object] = [None, None]  # CUDA: the event each pinned read slot is free at
        for n, i in enumerate(range(0, rows, step)):
            j = min(i + step, rows)
            work = self._buffer("work", (j - i) * row_elems, torch.float32, self.device)
            work = work.view(j - i, *row_shape)  # (k, ...) float32
            k = max(0, min(j, src_rows) - i)  # rows that come from the input
            if k:
                slot = n % 2 if cuda else 0  # CUDA: the next block is read while one uploads
                if uploads[slot] is not None:
                    uploads[slot].synchronize()
                scratch = self._buffer(f"read{slot}", k * row_bytes, torch.uint8,
                                       torch.device("cpu"), pinned=cuda)
                block = reader.read_rows(info.name, i, i + k, scratch)
                work[:k].copy_(block, non_blocking=cuda)
                if cuda:
                    uploads[slot] = torch.cuda.Event()
                    uploads[slot].record()
            for apply in steps:
                apply(work, i, j)
            yield i, j, work

    # -- the merge steps: one builder per op type, each returning its BlockStep ------------------

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        return self.adapter.read(key).to(self.device)

    def _resize_step(self, op: Resize, reader: Reader, info: TensorInfo) -> BlockStep:
        """New vocabulary rows (past the input's) get the input's mean row; a cut needs nothing
        (only the first ``op.rows`` rows are streamed)."""
        src_rows = info.shape[0]
        if op.rows <= src_rows:
            return _no_step
        mean_row = self.mean_row(None, reader, info)  # (1, dim)

        def fill(work: torch.Tensor, i: int, j: int) -> None:
            k = max(0, min(j, src_rows) - i)
            if k < j - i:
                work[k:].copy_(mean_row.expand(j - i - k, *mean_row.shape[1:]))
        return fill

    def lora_pair(self, op: Lora) -> _Lora:
        """Module ``op.module``'s LoRA pair as this op merges it: the whole pair, or one expert's
        slice of a whole-parameter LoRA (``op.part``); float32 on the device."""
        spec = self.adapter.modules[op.module]
        magnitude = self._adapter_tensor(spec.magnitude_key).float() if spec.magnitude_key else None
        if op.part is not None:  # one expert's slice of a whole-parameter LoRA
            a, b = self._expert_factors(op.part, *self._stacked_factors(op.module))
            return _Lora(a, b, op.part.scale, magnitude)
        a, b = self._adapter_tensor(spec.a_key).float(), self._adapter_tensor(spec.b_key).float()
        return _Lora(a, b, spec.scale, magnitude)

    def _stacked_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole-parameter LoRA's stacked ``lora_A`` (r·E, in) and ``lora_B`` (out, r·E), as
        stored, on the CPU: experts are cut from these before any conversion or device copy."""
        spec = self.adapter.modules[module]
        return self.adapter.read(spec.a_key), self.adapter.read(spec.b_key)

    def _expert_factors(self, part: LoraPart, a: torch.Tensor,
                        b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's factors ``(a2 (r, n1), b2 (n0, r))``, float32 on the device: sliced in the
        stored dtype first (the same bits as slicing after the cast), so only 1/E of the stacked
        factors is ever converted or moved."""
        a2, b2 = part.factors(a, b)
        return a2.to(self.device).float(), b2.to(self.device).float()

    def _lora_step(self, op: Lora, reader: Reader, info: TensorInfo) -> BlockStep:
        lora = self.lora_pair(op)
        col_scale = self._dora_column_scale(reader, info, lora) \
            if lora.magnitude is not None and op.transposed else None

        def merge(work: torch.Tensor, i: int, j: int) -> None:
            self._merge_block(work, lora, i, j, op.transposed, col_scale)
        return merge

    def _experts_step(self, op: Experts, reader: Reader, info: TensorInfo) -> BlockStep:
        """Rows of a tensor holding several experts: each expert's rows get that expert's update
        only, with its own factors (one expert's factors alive at a time)."""
        a, b = self._stacked_factors(op.module)
        current: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the last expert's factors

        def factors(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            if k not in current:
                current.clear()
                current[k] = self._expert_factors(op.part(k), a, b)  # (r, n1), (n0, r)
            return current[k]

        def merge(work: torch.Tensor, i: int, j: int) -> None:
            merge_experts(work, op, factors, i, j)
        return merge

    def _embedding_lora_step(self, op: EmbeddingLora, reader: Reader,
                             info: TensorInfo) -> BlockStep:
        spec = self.adapter.modules[op.module]
        a = self._adapter_tensor(spec.a_key).float()  # (r, rows)
        b = self._adapter_tensor(spec.b_key).float()  # (dim, r)

        def add(work: torch.Tensor, i: int, j: int) -> None:
            for t in range(i, j, ROW_TILE):
                u = min(t + ROW_TILE, j)
                # (n, r) @ (r, dim) -> (n, dim): rows [t, u) of (B @ A).T, as the table lays out
                delta = torch.mm(a[:, t:u].T, b.T)
                delta.mul_(spec.scale)
                work[t - i:u - i].add_(delta)
        return add

    def _lora_bias_step(self, op: LoraBias, reader: Reader, info: TensorInfo) -> BlockStep:
        """``s * lora_B.bias``, added to the (1-D) bias as one block."""
        spec = self.adapter.modules[op.module]
        bias = self._adapter_tensor(spec.bias_key).float() * spec.scale  # (out,)

        def add(work: torch.Tensor, i: int, j: int) -> None:
            work.add_(bias)
        return add

    def _token_rows_step(self, op: TokenRows, reader: Reader, info: TensorInfo) -> BlockStep:
        """Trainable tokens: their rows overwritten by the trained values."""
        key, indices = self.adapter.token_deltas[op.module]
        tokens = (torch.tensor(indices, device=self.device), self._adapter_tensor(key).float())

        def overwrite(work: torch.Tensor, i: int, j: int) -> None:
            self._set_token_rows(work, tokens, i, j)
        return overwrite

    @staticmethod
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

    def _dora_column_scale(self, reader: Reader, info: TensorInfo, lora: _Lora) -> torch.Tensor:
        """DoRA on a Conv1D weight stored ``(in, out)``: the row norms of the merged
        ``(out, in)`` weight are column norms here, so a first pass over the blocks sums their
        squares; returns ``m / ||W + dW||`` per output, (out,)."""
        plain = _Lora(lora.a, lora.b, lora.scale, None)
        squares = torch.zeros(info.shape[1], dtype=torch.float64, device=self.device)
        for i in range(0, info.shape[0], STAT_ROWS):
            j = min(i + STAT_ROWS, info.shape[0])
            work = reader.read_rows(info.name, i, j).to(self.device).float()
            self._merge_block(work, plain, i, j, True)
            squares += work.double().square().sum(dim=0)  # (out,)
        return lora.magnitude / squares.sqrt().float()

    def mean_row(self, plan: TensorPlan | None, reader: Reader, info: TensorInfo) -> torch.Tensor:
        """New vocabulary rows: the mean of the input's rows (accumulated block by block in
        float64), in the input's dtype as transformers' mean resizing stores it, (1, dim)."""
        total = torch.zeros(info.shape[1:], dtype=torch.float64, device=self.device)
        for i in range(0, info.shape[0], STAT_ROWS):
            j = min(i + STAT_ROWS, info.shape[0])
            total += reader.read_rows(info.name, i, j).to(self.device).double().sum(dim=0)
        mean = (total / info.shape[0]).float()
        return mean.to(DTYPES[info.dtype]).float().unsqueeze(0)

    @staticmethod
    def _set_token_rows(work: torch.Tensor, tokens: tuple[torch.Tensor, torch.Tensor],
                        i: int, j: int) -> None:
        indices, values = tokens
        inside = (indices >= i) & (indices < j)
        if bool(inside.any()):
            work[indices[inside] - i] = values[inside]

    # -- the same ops on a whole tensor (a quantized unit) ----------------------------------

    def _whole_resize(self, op: Resize, tensor: torch.Tensor) -> torch.Tensor:
        return resize_rows(tensor, op.rows)

    def _whole_lora(self, op: Lora, tensor: torch.Tensor) -> torch.Tensor:
        lora = self.lora_pair(op)
        return merge_linear(tensor, lora.a, lora.b, lora.scale, fan_in_fan_out=op.transposed,
                            magnitude=lora.magnitude)

    def _whole_experts(self, op: Experts, tensor: torch.Tensor) -> torch.Tensor:
        a, b = self._stacked_factors(op.module)
        work = tensor.float().clone()  # (count * n0, n1)
        merge_experts(work, op, lambda k: self._expert_factors(op.part(k), a, b), 0, work.shape[0])
        return work

    def _whole_embedding_lora(self, op: EmbeddingLora, tensor: torch.Tensor) -> torch.Tensor:
        spec = self.adapter.modules[op.module]
        delta = embedding_delta(self._adapter_tensor(spec.a_key),
                                self._adapter_tensor(spec.b_key), spec.scale)
        return tensor.float() + delta  # (rows, dim)

    def _whole_lora_bias(self, op: LoraBias, tensor: torch.Tensor) -> torch.Tensor:
        spec = self.adapter.modules[op.module]
        return merge_bias(tensor, self._adapter_tensor(spec.bias_key), spec.scale)

    def _whole_token_rows(self, op: TokenRows, tensor: torch.Tensor) -> torch.Tensor:
        key, indices = self.adapter.token_deltas[op.module]
        tensor = tensor.float().clone()
        tensor[torch.tensor(indices, device=self.device)] = self._adapter_tensor(key).float()
        return tensor


def _no_step(work: torch.Tensor, i: int, j: int) -> None:
    return None


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


# source type -> the reader of its tensor
_SOURCE_READERS: dict[type, Callable[[TensorSource, BaseModel], tuple[Reader, TensorInfo]]] = {
    BaseTensor: TensorSource._base_input,
    AdapterTensor: TensorSource._adapter_input,
    OriginalTensor: TensorSource._original_input,
    QuantizedUnit: TensorSource._quantized_input,
}
# op type -> the builder of its step on row blocks
_BLOCK_STEPS: dict[type, Callable[[TensorSource, BaseModel, Reader, TensorInfo], BlockStep]] = {
    Resize: TensorSource._resize_step,
    Lora: TensorSource._lora_step,
    Experts: TensorSource._experts_step,
    EmbeddingLora: TensorSource._embedding_lora_step,
    LoraBias: TensorSource._lora_bias_step,
    TokenRows: TensorSource._token_rows_step,
}
# op type -> the op on a whole tensor
_WHOLE_OPS: dict[type, Callable[[TensorSource, BaseModel, torch.Tensor], torch.Tensor]] = {
    Resize: TensorSource._whole_resize,
    Lora: TensorSource._whole_lora,
    Experts: TensorSource._whole_experts,
    EmbeddingLora: TensorSource._whole_embedding_lora,
    LoraBias: TensorSource._whole_lora_bias,
    TokenRows: TensorSource._whole_token_rows,
}


def _require_finite(plan: TensorPlan, tensor: torch.Tensor) -> None:
    """Fail the group when a merged tensor holds NaN or Inf, naming it."""
    if not all_finite(tensor):
        raise AdapterError(
            f"merged tensor '{plan.name}' holds NaN or Inf as {plan.dtype}: the merged values "
            "exceed the output dtype's range, or the adapter weights are not finite. Check the "
            "training run, or choose a wider `dtype` (bfloat16 or float32)")


def write_requantized(writer: ShardWriter, plan: TensorPlan, source: TensorSource) -> None:
    """merged_4bit, streamed: merge row blocks, encode each in the unit's layout as it comes,
    then write the (small) siblings."""
    spec = plan.encoding.unit
    logical = plan.model_copy(update={"shape": list(spec.shape), "dtype": "F32", "parts": []})
    encoder = RowRequantizer(spec, source.device)
    writer.begin(*plan.outputs()[0])
    row_elems = spec.shape[1]
    step = source.rows_per_block(logical, row_elems)
    for i, j, work in source.merged_rows(logical, spec.shape[0], row_elems, step):
        if not fits(work, torch.float32):
            _require_finite(plan, work)
        writer.append(encoder.encode(i, j, work))
    writer.end()
    for name, tensor in encoder.siblings().items():
        writer.write(name, tensor)


def write_tensor(writer: ShardWriter, plan: TensorPlan, source: TensorSource) -> None:
    """Stream one plan entry (and, for a quantized unit, its siblings) into ``writer``."""
    if isinstance(plan.encoding, Requantize) and plan.find(Resize) is None \
            and RowDequantizer.streams(plan.encoding.unit):
        write_requantized(writer, plan, source)
        return
    if source.is_unit(plan):
        for name, tensor in source.produce_all(plan):
            writer.write(name, tensor)
        return
    writer.begin(plan.name, plan.dtype, plan.shape)
    stored = source.stored_bytes(plan)
    if stored is not None:
        reader, info = stored
        writer.copy_from(lambda start, buf: reader.pread(info, start, buf), info.nbytes,
                         min(COPY_CHUNK, source.block_bytes))
    else:
        for block, ready, release in source.blocks(plan):
            writer.append(block, ready, release)
    writer.end()


def write_shard(shard: ShardPlan, source: TensorSource, folder: Path,
                progress: Progress | None = None) -> ShardResult:
    """Write one planned shard into ``folder`` atomically; memory stays at a few blocks."""
    specs = [spec for t in shard.tensors for spec in t.outputs()]
    with ShardWriter(folder / shard.filename, specs) as writer:
        for plan in shard.tensors:
            write_tensor(writer, plan, source)
            if progress is not None:
                progress(plan)
    return ShardResult(filename=shard.filename, size=writer.size, sha256=writer.sha256)


def open_source(plan: MergePlan, adapter: Adapter | None = None, device: str = "cpu",
                block_bytes: int | None = None) -> TensorSource:
    """Open a plan's inputs (headers only) for executing its shards."""
    from mergeflow.model.adapter import load_adapter

    original = Checkpoint(plan.original) if plan.original else None
    block = block_bytes or int(plan.runtime.get("block_bytes") or DEFAULT_BLOCK_BYTES)
    return TensorSource(Checkpoint(plan.base), adapter or load_adapter(plan.adapter), device,
                        original, block_bytes=block)
