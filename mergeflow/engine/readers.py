"""Where a plan entry's input is read from, row block by row block, and the buffers it goes through.

A planned tensor's input is one of: a base tensor, an adapter tensor (from safetensors, or from a
legacy ``adapter_model.bin`` already in memory), a tensor of the original 16-bit checkpoint, or a
bitsandbytes unit decoded by rows (:class:`mergeflow.engine.codecs.RowDequantizer`). Each is read
with ``read_rows(name, start, stop, scratch)``; a tensor holding several experts is read in its
row shape (:class:`RowView`), so a row block never has to hold a whole expert.

Buffers are reused per thread: the float32 work block, the read slots (pinned on CUDA, where the
next block is read while the last one uploads: :class:`RowUploader`) and the pools of encoded
blocks handed to the shard writer (:class:`_BufferPool`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from pydantic import BaseModel

from mergeflow.engine.codecs import RowDequantizer, dequantize
from mergeflow.errors import MergeError
from mergeflow.model.adapter import Adapter
from mergeflow.model.checkpoint import DTYPES, Checkpoint, TensorInfo, row_runs
from mergeflow.model.quant import output_keys
from mergeflow.plan import (
    AdapterTensor,
    BaseTensor,
    Cast,
    Experts,
    OriginalTensor,
    QuantizedUnit,
    Resize,
    TensorPlan,
)
from mergeflow.storage.hashing import hashing_behind, wait_for_hashes

READ_SLOTS = 3  # 16-bit read buffers per thread: one read into while two are hashed
DEFAULT_BLOCK_BYTES = 12 * 2**20  # float32 working bytes per block (the --block-size default)
# GEMMs run on tiles of this many rows at fixed positions (multiples of it from row 0), so the
# kernel path - and so every last bit - never depends on the block size; blocks are whole tiles.
ROW_TILE = 64


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


def is_unit(plan: TensorPlan) -> bool:
    """True for a quantized unit produced whole (with its siblings, or re-quantized, or one
    whose rows do not decode on their own); a dequantized unit otherwise streams by rows."""
    if not isinstance(plan.encoding, Cast):
        return True
    return isinstance(plan.source, QuantizedUnit) and (
        plan.find(Resize) is not None or not RowDequantizer.streams(plan.source.unit))


def rows_per_block(block_bytes: int, plan: TensorPlan, row_elems: int) -> int:
    """Rows per block: as many float32 rows as ``block_bytes`` holds, then evened out over
    the tensor so that no block is a sliver (a 1-row GEMM takes another kernel path)."""
    shape = plan.row_shape
    rows = shape[0] if shape else 1
    # whole tiles that fit the budget (at least one), then evened out over the tensor
    per_block = max(1, block_bytes // max(1, 4 * row_elems * ROW_TILE))
    tiles = -(-rows // ROW_TILE)
    blocks = -(-tiles // per_block)
    return -(-tiles // blocks) * ROW_TILE


class PlanInputs:
    """The inputs of plan entries: the base, the adapter and (for ``merge_onto=original``) the
    original 16-bit checkpoint; a quantized unit is decoded on ``device``."""

    def __init__(self, base: Checkpoint, adapter: Adapter, device: torch.device,
                 original: Checkpoint | None = None) -> None:
        self.base = base
        self.adapter = adapter
        self.device = device
        self.original = original

    def input_reader(self, plan: TensorPlan) -> tuple[Reader, TensorInfo]:
        """The reader holding a plan entry's input tensor, and that tensor's header, in the
        entry's row shape (:attr:`TensorPlan.row_shape`; for a quantized unit decoded by rows:
        its decoded float32 view)."""
        shape = plan.row_shape
        if isinstance(plan.source, QuantizedUnit):  # decoded in the rows the merge streams
            return self._quantized_input(plan.source, shape)
        reader, info = _SOURCE_READERS[type(plan.source)](self, plan.source)
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

    def _quantized_input(self, source: QuantizedUnit, row_shape: list[int] | None = None
                         ) -> tuple[RowDequantizer, TensorInfo]:
        spec = source.unit
        info = self.base.tensors[spec.weight]
        shape = tuple(row_shape or spec.shape)
        return (RowDequantizer(spec, self.base, self.device, list(shape)),
                TensorInfo(spec.weight, info.file, shape, "F32"))

    def stored_bytes(self, plan: TensorPlan) -> tuple[Checkpoint, TensorInfo] | None:
        """The input whose bytes are exactly this entry's output (copied, never decoded), or
        None when the entry must be computed or cast."""
        if plan.computes or is_unit(plan):
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


# source type -> the reader of its tensor
_SOURCE_READERS: dict[type, Callable[[PlanInputs, BaseModel], tuple[Reader, TensorInfo]]] = {
    BaseTensor: PlanInputs._base_input,
    AdapterTensor: PlanInputs._adapter_input,
    OriginalTensor: PlanInputs._original_input,
    QuantizedUnit: PlanInputs._quantized_input,
}


class ThreadBuffers:
    """Per-thread buffers reused across blocks and tensors: working and read buffers by kind,
    and this thread's pools of encoded blocks.

    Args:
        block_bytes: float32 bytes of one row block.
    """

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes = block_bytes
        self._local = threading.local()  # per-thread reusable buffers

    def buffer(self, kind: str, numel: int, dtype: torch.dtype, device: torch.device,
               pinned: bool = False) -> torch.Tensor:
        """A per-thread buffer of at least ``numel`` elements, reused across blocks and tensors."""
        key = (kind, dtype, device.type, pinned)
        cache = self._local.__dict__.setdefault("buffers", {})
        buf = cache.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device, pin_memory=pinned)
            cache[key] = buf
        return buf[:numel]

    def pool(self, itemsize: int) -> _BufferPool:
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


class RowUploader:
    """Reads a plan entry's input rows into the float32 work buffer on the device, through read
    slots used in turn: stored 16-bit rows are hashed behind the read while the next block is
    read into the next slot, and on CUDA the rows go host-to-device from pinned slots, so the
    next block is read while the last one uploads (see :meth:`_load`).

    Args:
        reader: the reader of the input.
        info: the input's header, in the entry's row shape.
        row_elems: elements per row of the row shape.
        buffers: this merge's per-thread buffers.
        device: where the work buffer lives.
    """

    def __init__(self, reader: Reader, info: TensorInfo, row_elems: int, buffers: ThreadBuffers,
                 device: torch.device) -> None:
        self.reader = reader
        self.info = info
        self.src_rows = info.shape[0]  # rows that come from the input
        self.row_bytes = row_elems * DTYPES[info.dtype].itemsize
        # 16-bit stored rows: read through READ_SLOTS slots, hashed behind the reads
        self.behind = isinstance(reader, Checkpoint | RowView) and DTYPES[info.dtype].itemsize <= 2
        self.buffers = buffers
        self.device = device
        self.cuda = device.type == "cuda"
        self._uploads: list[object] = [None] * READ_SLOTS  # CUDA: when each pinned slot is free

    def blocks(self, row_shape: Sequence[int], row_elems: int, rows: int, step: int
               ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(i, j, work)`` for consecutive blocks of ``step`` rows: a reused float32 buffer of
        shape ``(j - i, *row_shape)`` on the device holding the input's rows ``[i, j)`` (rows past
        the input's are left as they are, for a merge step to fill)."""
        try:
            for n, i in enumerate(range(0, rows, step)):
                j = min(i + step, rows)
                work = self.buffers.buffer("work", (j - i) * row_elems, torch.float32, self.device)
                work = work.view(j - i, *row_shape)  # (k, ...) float32
                k = max(0, min(j, self.src_rows) - i)  # rows that come from the input
                if k:
                    self._load(work, n, i, k)
                yield i, j, work
        finally:
            wait_for_hashes()  # the input's digests are whole up to here

    def _load(self, work: torch.Tensor, n: int, i: int, k: int) -> None:
        """Copy input rows ``[i, i + k)`` into ``work[:k]``. Stored 16-bit rows (a plain or
        reshaped checkpoint tensor) go through read slot ``n % 3`` and are hashed for the
        manifest behind the read, on another thread, while this one merges them
        (:func:`hashing_behind`); other inputs through slot 0 (CPU) or ``n % 2`` (CUDA: the next
        block is read while one uploads), hashed as they are read."""
        if self.behind:
            slot = n % READ_SLOTS
            with hashing_behind(slot):
                self._read_into(work, slot, i, k)
        else:  # float32 rows (slots a block each), or a decoder that may rework its bytes
            wait_for_hashes()  # the read slots may be read into again
            self._read_into(work, n % 2 if self.cuda else 0, i, k)

    def _read_into(self, work: torch.Tensor, slot: int, i: int, k: int) -> None:
        """Read rows ``[i, i + k)`` into read slot ``slot`` and copy them into ``work[:k]``."""
        cuda = self.cuda
        if self._uploads[slot] is not None:
            self._uploads[slot].synchronize()
        scratch = self.buffers.buffer(f"read{slot}", k * self.row_bytes, torch.uint8,
                                      torch.device("cpu"), pinned=cuda)
        block = self.reader.read_rows(self.info.name, i, i + k, scratch)
        work[:k].copy_(block, non_blocking=cuda)
        if cuda:
            self._uploads[slot] = torch.cuda.Event()
            self._uploads[slot].record()
