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
* **an encoded weight** - merged_4bit's re-quantized bitsandbytes unit or save_method fp8's
  float8 weight: merged by row blocks (whole scale blocks of rows) and encoded as they come; the
  small siblings (absmax, scales) follow it. A unit whose rows do not decode on their own is
  dequantized, merged and re-quantized whole (4-bit storage is a quarter of the 16-bit size;
  see ``docs/benchmarks.md``).

Memory per worker is therefore about ``block_bytes`` of float32 work plus the writer's queue of
encoded blocks, whatever the model's width. On CUDA the blocks go host-to-device from pinned
buffers, are merged on the device in float32, and come back asynchronously: the writer thread
waits for each block's copy event, so the next block is read while the last one travels.

Reading is :mod:`mergeflow.engine.readers`, merging :mod:`mergeflow.engine.ops`
(:class:`~mergeflow.engine.ops.TensorMerger`), encoding a quantized unit
:mod:`mergeflow.engine.codecs`; this module writes what they yield.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel

from mergeflow.engine.codecs import RowDequantizer, RowRequantizer
from mergeflow.engine.fp8 import Fp8Encoder, TransformersFp8Encoder, requantizer
from mergeflow.engine.ops import TensorMerger, require_finite
from mergeflow.engine.readers import DEFAULT_BLOCK_BYTES
from mergeflow.engine.writer import ShardWriter
from mergeflow.math.numerics import fits
from mergeflow.model.adapter import Adapter
from mergeflow.model.checkpoint import Checkpoint
from mergeflow.plan import Cast, Fp8, MergePlan, Requantize, Resize, ShardPlan, TensorPlan

Progress = Callable[[TensorPlan], None]

COPY_CHUNK = 8 * 2**20  # pass-through copies move this many bytes at a time


class ShardResult(BaseModel):
    """A finished shard file: its name, size and sha256."""

    filename: str
    size: int
    sha256: str
    resumed: bool = False  # found finished by an earlier run, not written by this one


def row_encoder(plan: TensorPlan, device: torch.device
                ) -> RowRequantizer | Fp8Encoder | TransformersFp8Encoder:
    """The encoder of an entry written in another layout than its dtype's values: merged_4bit's
    re-quantizer in the base's own format (bitsandbytes or FP8), or save_method fp8's
    compressed-tensors encoder."""
    if isinstance(plan.encoding, Fp8):
        return Fp8Encoder.for_scheme(plan.name, plan.shape, plan.encoding.scheme,
                                     plan.encoding.dtype, device)
    if plan.encoding.unit.method == "fp8":
        return requantizer(plan.encoding.unit, plan.parts[0].dtype, device)
    return RowRequantizer(plan.encoding.unit, device)


def streams_encoded(plan: TensorPlan) -> bool:
    """True when an encoded entry can be merged and encoded row block by row block."""
    if isinstance(plan.encoding, Fp8):
        return True
    return isinstance(plan.encoding, Requantize) and plan.find(Resize) is None \
        and RowDequantizer.streams(plan.encoding.unit)


def write_encoded(writer: ShardWriter, plan: TensorPlan, merger: TensorMerger) -> None:
    """merged_4bit or fp8, streamed: merge row blocks (whole scale blocks of rows), encode each
    as it comes, then write the (small) siblings."""
    encoder = row_encoder(plan, merger.device)
    shape = plan.encoding.unit.shape if isinstance(plan.encoding, Requantize) else plan.shape
    logical = plan.model_copy(update={"shape": list(shape), "dtype": "F32", "parts": [],
                                      "encoding": Cast()})
    writer.begin(*plan.outputs()[0])
    row_elems = shape[1]
    multiple = getattr(encoder, "row_multiple", 1)
    step = -(-merger.rows_per_block(logical, row_elems) // multiple) * multiple
    for i, j, work in merger.merged_rows(logical, shape[0], row_elems, step):
        if not fits(work, torch.float32):
            require_finite(plan, work)
        writer.append(encoder.encode(i, j, work))
    writer.end()
    for name, tensor in encoder.siblings().items():
        writer.write(name, tensor)


def write_tensor(writer: ShardWriter, plan: TensorPlan, merger: TensorMerger) -> None:
    """Stream one plan entry (and, for a quantized unit, its siblings) into ``writer``."""
    if streams_encoded(plan):
        write_encoded(writer, plan, merger)
        return
    if merger.is_unit(plan):
        for name, tensor in merger.produce_all(plan):
            writer.write(name, tensor)
        return
    writer.begin(plan.name, plan.dtype, plan.shape)
    stored = merger.stored_bytes(plan)
    if stored is not None:
        reader, info = stored
        writer.copy_from(lambda start, buf: reader.pread(info, start, buf), info.nbytes,
                         min(COPY_CHUNK, merger.block_bytes))
    else:
        for block, ready, release in merger.blocks(plan):
            writer.append(block, ready, release)
    writer.end()


def write_shard(shard: ShardPlan, merger: TensorMerger, folder: Path,
                progress: Progress | None = None) -> ShardResult:
    """Write one planned shard into ``folder`` atomically; memory stays at a few blocks."""
    specs = [spec for t in shard.tensors for spec in t.outputs()]
    with ShardWriter(folder / shard.filename, specs) as writer:
        for plan in shard.tensors:
            write_tensor(writer, plan, merger)
            if progress is not None:
                progress(plan)
    return ShardResult(filename=shard.filename, size=writer.size, sha256=writer.sha256)


def open_merger(plan: MergePlan, adapter: Adapter | None = None, device: str = "cpu",
                block_bytes: int | None = None) -> TensorMerger:
    """Open a plan's inputs (headers only) for executing its shards."""
    from mergeflow.model.adapter import load_adapter

    original = Checkpoint(plan.original) if plan.original else None
    block = block_bytes or int(plan.runtime.get("block_bytes") or DEFAULT_BLOCK_BYTES)
    return TensorMerger(Checkpoint(plan.base), adapter or load_adapter(plan.adapter), device,
                        original, block_bytes=block)
