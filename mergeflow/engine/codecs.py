"""bitsandbytes codecs: decode a quantized unit into a float32 weight and encode a merged weight
back into the unit's own layout, whole or row block by row block.

What a unit is - its stored weight, its siblings and their sizes - is a planning fact and lives in
:mod:`mergeflow.model.quant` (:class:`~mergeflow.model.quant.QuantSpec`,
:func:`~mergeflow.model.quant.output_keys`); this module only runs bitsandbytes on it.
:func:`dequantize` turns a unit into a float32 weight and :func:`requantize` turns a merged float
weight back into the same layout, with the base's own settings; :class:`RowDequantizer` and
:class:`RowRequantizer` do the same one row block at a time, so a merge never holds the whole
weight. Decoding and encoding are bitsandbytes' own (``bitsandbytes.functional``); nothing here
re-implements a code book.
"""

from __future__ import annotations

import torch

from mergeflow.engine import fp8, mxfp4
from mergeflow.errors import MergeError
from mergeflow.model.checkpoint import DTYPES, Checkpoint, row_runs
from mergeflow.model.quant import ROW_FORMAT, QuantSpec, output_keys


def _unit_tensors(spec: QuantSpec, tensors: dict[str, torch.Tensor],
                  device: torch.device) -> dict[str, torch.Tensor]:
    return {role: tensors[key].to(device) for role, key in spec.siblings.items()}


def dequantize(spec: QuantSpec, tensors: dict[str, torch.Tensor],
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Decode one unit into a float32 weight of its real shape, on ``device``.

    Args:
        spec: the unit.
        tensors: the stored weight and every sibling, by base key (CPU is fine).
        device: where to decode (bitsandbytes runs on CPU and CUDA).

    Returns:
        The weight, float32, shape ``spec.shape`` (e.g. (out, in)).
    """
    device = torch.device(device)
    if spec.method == "fp8":
        return fp8.decode_whole(spec, tensors, device)
    if spec.method == "mxfp4":
        return mxfp4.decode_whole(spec, tensors, device)
    import bitsandbytes.functional as bnbf

    stored = tensors[spec.weight].to(device)
    if spec.method == "bnb4":
        state = bnbf.QuantState.from_dict(_unit_tensors(spec, tensors, device), device)
        # packed (n/2, 1) uint8 -> (out, in) in the quant state's dtype
        return bnbf.dequantize_4bit(stored, state).float()
    scb = tensors[spec.siblings["SCB"]].to(device).float()  # (out,)
    return stored.float() * scb[:, None] / 127  # (out, in) * (out, 1)


class RowDequantizer:
    """Decodes one unit row block by row block, so a merge never holds the whole weight.

    4-bit: rows ``[i, j)`` of an ``(out, in)`` weight are elements ``[i*in, j*in)``; when ``in``
    is a multiple of the blocksize (and even), they are whole quantization blocks, so the packed
    bytes ``[i*in/2, j*in/2)`` and the absmax entries ``[i*in/bs, j*in/bs)`` decode on their own,
    with bitsandbytes' own kernel, to exactly the values of a whole-weight decode. A
    double-quantized absmax (a few MB even for a 70B layer) is decoded once, as bitsandbytes does.
    8-bit: each row is ``int8 * SCB[row] / 127``. FP8: each row is ``q * S`` with the scale rows
    that cover it (:class:`mergeflow.engine.fp8.Fp8Decoder`). MXFP4: one expert at a time, by
    transformers' own conversion (:class:`mergeflow.engine.mxfp4.Mxfp4Decoder`), in the row
    shape the merge streams (``row_shape``: whole experts, or the experts' rows).
    """

    def __init__(self, spec: QuantSpec, base: Checkpoint, device: torch.device | str = "cpu",
                 row_shape: list[int] | None = None) -> None:
        self.spec = spec
        self.base = base
        self.device = torch.device(device)
        if spec.method == "fp8":
            self.decoder = fp8.Fp8Decoder(spec, base, self.device)
            return
        if spec.method == "mxfp4":
            self.decoder = mxfp4.Mxfp4Decoder(spec, base, self.device, row_shape or spec.shape)
            return
        siblings = base.read_many(sorted(spec.siblings.values()))
        if spec.method == "bnb8":
            self.scb = siblings[spec.siblings["SCB"]].to(self.device).float()  # (out,)
            return
        import bitsandbytes.functional as bnbf

        state = bnbf.QuantState.from_dict(
            {role: siblings[key].to(self.device) for role, key in spec.siblings.items()},
            self.device)
        absmax = state.absmax
        if state.nested:  # as bitsandbytes' dequantize_4bit: decode the absmax, add the offset
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        self.absmax = absmax.float()  # (blocks,)
        self.dtype = state.dtype

    @staticmethod
    def streams(spec: QuantSpec) -> bool:
        """True when the unit's rows decode independently (always for 8-bit; for 4-bit when a
        row is whole quantization blocks)."""
        if spec.method in ("bnb8", "fp8", "mxfp4"):
            return True
        return len(spec.shape) == 2 and spec.shape[1] % (spec.blocksize or 1) == 0 \
            and spec.shape[1] % 2 == 0

    def read_rows(self, name: str, start: int, stop: int,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of the decoded weight, float32 (k, in), on the device."""
        spec = self.spec
        cols = spec.shape[1]
        if spec.method in ("fp8", "mxfp4"):
            return self.decoder.read_rows(start, stop)  # float32 (k, ...)
        if spec.method == "bnb8":
            stored = self.base.read_rows(spec.weight, start, stop).to(self.device)  # int8 (k, in)
            return stored.float() * self.scb[start:stop, None] / 127  # (k, in) * (k, 1)
        per = cols // spec.blocksize
        packed = self.base.read_rows(spec.weight, start * cols // 2, stop * cols // 2)
        out = torch.ops.bitsandbytes.dequantize_4bit.default(
            packed.to(self.device), self.absmax[start * per:stop * per], spec.blocksize,
            spec.quant_type, [stop - start, cols], self.dtype)  # (k, in) in the state's dtype
        return out.float()

    def read_row_set(self, name: str, rows: list[int]) -> torch.Tensor:
        """The given rows of the decoded weight, stacked, float32 (CPU)."""
        parts = [self.read_rows(name, a, b).cpu() for a, b in row_runs(rows)]
        return torch.cat(parts) if parts else torch.empty(0, *self.spec.shape[1:])


class RowRequantizer:
    """Encodes a merged weight row block by row block in a unit's own layout (merged_4bit).

    4-bit: quantization blocks never straddle rows when a row is whole blocks (see
    :meth:`RowDequantizer.streams`), so each row block is quantized on its own by bitsandbytes'
    kernel, giving the packed bytes and per-block absmax of a whole-weight call; the absmax
    (1/16 of the float32 weight at most) is kept, and once every row is encoded it is stored as
    bitsandbytes would (double quant: offset = mean, blockwise-quantized in blocks of 256).
    8-bit: ``int8_vectorwise_quant`` works per row; the SCB rows are collected likewise.
    """

    def __init__(self, spec: QuantSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        rows = spec.shape[0]
        if spec.method == "bnb8":
            self.scb = torch.empty(rows, dtype=torch.float32, device=self.device)
        else:
            per = spec.shape[1] // spec.blocksize
            self.absmax = torch.empty(rows * per, dtype=torch.float32, device=self.device)

    def encode(self, start: int, stop: int, rows: torch.Tensor) -> torch.Tensor:
        """The stored bytes of merged rows ``[start, stop)`` (float32 (k, in)), on the CPU:
        packed uint8 (k*in/2, 1) for 4-bit, int8 (k, in) for 8-bit."""
        import bitsandbytes.functional as bnbf

        spec = self.spec
        if spec.method == "bnb8":
            # as Int8Params: float16 rows -> int8 (k, in) + absmax per row (k,)
            cb, scb, _ = bnbf.int8_vectorwise_quant(rows.to(torch.float16).contiguous())
            self.scb[start:stop] = scb.float()
            return cb.cpu()
        per = spec.shape[1] // spec.blocksize
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(
            rows.to(DTYPES[spec.dtype]).contiguous(), spec.blocksize, spec.quant_type,
            torch.uint8)
        self.absmax[start * per:stop * per] = absmax.reshape(-1)
        return packed.cpu()

    def siblings(self) -> dict[str, torch.Tensor]:
        """Every sibling of the encoded weight by base key, in :func:`output_keys` order (the
        weight itself excluded), on the CPU."""
        import bitsandbytes.functional as bnbf

        spec = self.spec
        if spec.method == "bnb8":
            out = {spec.siblings["SCB"]: self.scb}
            if "weight_format" in spec.siblings:
                out[spec.siblings["weight_format"]] = torch.tensor(ROW_FORMAT, dtype=torch.uint8)
            return {k: out[k].cpu() for k in output_keys(spec)[1:]}
        code = bnbf.get_4bit_type(spec.quant_type, device=self.device)
        common = dict(shape=torch.Size(spec.shape), dtype=DTYPES[spec.dtype],
                      blocksize=spec.blocksize, code=code, quant_type=spec.quant_type)
        if spec.nested:  # as bitsandbytes' quantize_4bit(compress_statistics=True)
            offset = self.absmax.mean()
            qabsmax, state2 = bnbf.quantize_blockwise(self.absmax - offset, blocksize=256)
            state = bnbf.QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)
        else:
            state = bnbf.QuantState(absmax=self.absmax, **common)
        out = _bnb4_siblings(spec, state)
        return {k: out[k].cpu() for k in output_keys(spec)[1:]}


def requantize(spec: QuantSpec, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Encode a merged float weight in the unit's own layout and settings.

    Args:
        spec: the base unit whose settings to use (quant type, blocksize, double quant, dtype).
        weight: the merged weight, shape ``spec.shape``, on any device bitsandbytes supports.

    Returns:
        The stored weight and its siblings by base key, on the CPU, in the order of
        :func:`output_keys` (4-bit: the quant-state JSON padded to ``spec.quant_state_size``).
    """
    import bitsandbytes.functional as bnbf

    if spec.method == "bnb8":
        # as bitsandbytes' Int8Params does: float16 rows -> int8 (out, in) + absmax per row (out,)
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        out = {spec.weight: cb, spec.siblings["SCB"]: scb.float()}
        if "weight_format" in spec.siblings:
            out[spec.siblings["weight_format"]] = torch.tensor(ROW_FORMAT, dtype=torch.uint8)
        return {k: out[k].cpu() for k in output_keys(spec)}
    # (out, in) -> packed ((out*in + 1) // 2, 1) uint8 + quant state
    packed, state = bnbf.quantize_4bit(
        weight.to(DTYPES[spec.dtype]).contiguous(), blocksize=spec.blocksize,
        compress_statistics=spec.nested, quant_type=spec.quant_type, quant_storage=torch.uint8)
    out = {spec.weight: packed, **_bnb4_siblings(spec, state)}
    return {k: out[k].cpu() for k in output_keys(spec)}


def _bnb4_siblings(spec: QuantSpec, state) -> dict[str, torch.Tensor]:
    """A re-quantized 4-bit unit's siblings by base key, from bitsandbytes' ``QuantState``
    (the quant-state JSON padded to its planned size)."""
    parts = state.as_dict(packed=True)
    out = {}
    for role, key in spec.siblings.items():
        if role not in parts:
            raise MergeError(f"bitsandbytes returned no '{role}' when re-quantizing "
                             f"'{spec.weight}' (a version mismatch; please report it)")
        out[key] = parts[role]
    out[spec.quant_state_key] = _pad(out[spec.quant_state_key], spec)
    return out


def _pad(packed_json: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Pad a packed quant-state JSON with spaces to its planned size."""
    extra = spec.quant_state_size - packed_json.numel()
    if extra < 0:
        raise MergeError(f"quant state of '{spec.weight}' is {packed_json.numel()} bytes, over the "
                         f"{spec.quant_state_size} planned (a planning bug; please report it)")
    return torch.cat([packed_json.cpu(), torch.full((extra,), ord(" "), dtype=torch.uint8)])


__all__ = ["RowDequantizer", "RowRequantizer", "dequantize", "requantize"]
