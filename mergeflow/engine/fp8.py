"""FP8 weights, row block by row block: decode a float8 unit of the base, and encode a merged
weight as the compressed-tensors FP8 that vLLM serves.

Decoding is one rule for every layout :mod:`mergeflow.model.fp8` reads,
``W[i, j] = q[i, j] * S[i // bh, j // bw]``, computed in float32 and rounded to the model's
dtype, as transformers' FP8 dequantizer (and compressed-tensors', in the scale's bf16) hands the
weights to the model the adapter was trained on; rows ``[i, j)`` need only the scale rows that
cover them.

Encoding runs compressed-tensors' own arithmetic (``calculate_qparams`` for the scales,
``quantize`` for the values) on the merged weight as a 16-bit checkpoint holds it, which is what
llm-compressor's data-free ``FP8_DYNAMIC`` / ``FP8_BLOCK`` schemes see when they run on a merged
model. A per-channel scale is a per-row maximum, and a 128x128 block scale needs only its 128
rows, so both stream: the encoder takes row blocks (whole scale blocks of rows) and keeps only
the scales, a ``1/in`` (or ``1/(128*128)``) of the weight.
"""

from __future__ import annotations

from typing import Literal

import torch

from mergeflow.errors import MergeError
from mergeflow.model.checkpoint import DTYPES, Checkpoint
from mergeflow.model.quant import QuantSpec
from mergeflow.plan.fp8 import BLOCK, PRESETS, scale_name

FP8 = torch.float8_e4m3fn


def scale_grid(shape: list[int], block: list[int]) -> list[int]:
    """The scale tensor's 2-D shape for a ``shape`` weight in ``block`` blocks."""
    return [-(-shape[0] // block[0]), -(-shape[1] // block[1])]


def scale_rows(scale: torch.Tensor, block: list[int], start: int, stop: int,
               cols: int) -> torch.Tensor:
    """The scale of each element of rows ``[start, stop)``: float32, ``(k, cols)``, or ``(k, 1)``
    when one scale covers a whole row (broadcasts the same)."""
    bh, bw = block
    first = start // bh
    rows = scale[first:(stop - 1) // bh + 1]  # (m, C): the scale rows covering [start, stop)
    rows = rows.repeat_interleave(bh, 0)[start - first * bh:stop - first * bh]  # (k, C)
    return rows if rows.shape[1] == 1 else rows.repeat_interleave(bw, 1)[:, :cols]


class Fp8Decoder:
    """Decodes one float8 unit of the base by rows: ``q * S`` in float32, rounded to the unit's
    dtype (the model's), as transformers dequantizes it.

    Args:
        spec: the unit (``spec.block``: the rows and columns each scale covers).
        base: the base checkpoint.
        device: where to decode.
    """

    def __init__(self, spec: QuantSpec, base: Checkpoint, device: torch.device) -> None:
        self.spec = spec
        self.base = base
        self.device = device
        key = next(iter(spec.siblings.values()))
        grid = scale_grid(spec.shape, spec.block or spec.shape)
        self.scale = base.read_many([key])[key].to(device).float().reshape(grid)  # (R, C)

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of the decoded weight, float32 ``(k, in)``, on the device."""
        stored = self.base.read_rows(self.spec.weight, start, stop).to(self.device)  # fp8 (k, in)
        values = stored.float() * scale_rows(self.scale, self.spec.block or self.spec.shape,
                                             start, stop, self.spec.shape[1])
        return values.to(DTYPES[self.spec.dtype]).float()


def decode_whole(spec: QuantSpec, tensors: dict[str, torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """A whole float8 unit decoded (rounded to ``spec.dtype``), float32 ``spec.shape``, from its
    stored tensors by key."""
    block = spec.block or spec.shape
    scale = tensors[next(iter(spec.siblings.values()))].to(device).float()
    scale = scale.reshape(scale_grid(spec.shape, block))  # (R, C)
    stored = tensors[spec.weight].to(device)  # fp8 (out, in)
    values = stored.float() * scale_rows(scale, block, 0, spec.shape[0], spec.shape[1])
    return values.to(DTYPES[spec.dtype]).float()


class TransformersFp8Encoder:
    """merged_4bit on a block-wise FP8 base (``weight_scale_inv``): the merged weight re-encoded
    by transformers' own FP8 quantizer (``Fp8Quantize``, what ``FineGrainedFP8Config`` runs), row
    block by row block, rows rounded to the model's dtype first. Blocks start on multiples of
    :attr:`row_multiple` (one scale block of rows).

    Args:
        spec: the base unit (its weight, scale key, block and dtype).
        scale_dtype: the stored scale's dtype (safetensors name).
        device: where to encode.
    """

    def __init__(self, spec: QuantSpec, scale_dtype: str, device: torch.device) -> None:
        self.weight = spec.weight
        self.scale_key = next(iter(spec.siblings.values()))
        self.dtype = DTYPES[spec.dtype]
        block = spec.block or spec.shape
        self.row_multiple = block[0]
        self.scales = torch.empty(scale_grid(spec.shape, block), dtype=DTYPES[scale_dtype],
                                  device=device)
        self._quantizer = _transformers_quantizer(block)

    def encode(self, start: int, stop: int, rows: torch.Tensor) -> torch.Tensor:
        """The float8 values of merged rows ``[start, stop)`` (float32 ``(k, in)``), on the CPU."""
        out = self._quantizer._quantize_one(self.weight, rows.to(self.dtype))
        values, scale = out[self.weight], out[self.scale_key]  # fp8 (k, in), (k / bh, C)
        if values.dtype != FP8:
            raise MergeError(f"transformers left '{self.weight}' rows {start}-{stop} unquantized "
                             "(a planning bug; please report it)")
        first = start // self.row_multiple
        self.scales[first:first + scale.shape[0]] = scale
        return values.cpu()

    def siblings(self) -> dict[str, torch.Tensor]:
        """The scale tensor by its base key, on the CPU."""
        return {self.scale_key: self.scales.cpu()}


def requantizer(spec: QuantSpec, scale_dtype: str, device: torch.device
                ) -> TransformersFp8Encoder | Fp8Encoder:
    """merged_4bit on an FP8 base: the encoder of the base's own format and tool (transformers'
    for block-wise FP8, compressed-tensors' for its format, with the base's strategy)."""
    role, key = next(iter(spec.siblings.items()))
    if role == "weight_scale_inv":
        return TransformersFp8Encoder(spec, scale_dtype, device)
    block = spec.block or spec.shape
    return Fp8Encoder(key, spec.shape, _compressed_tensors_args(block), block, spec.dtype,
                      scale_dtype, device)


def _transformers_quantizer(block: list[int]):
    """transformers' FP8 quantizer for ``block``-sized tiles (the one it runs for
    ``FineGrainedFP8Config(weight_block_size=block)``)."""
    from types import SimpleNamespace

    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = FineGrainedFP8Config(weight_block_size=tuple(block))
    return Fp8Quantize(SimpleNamespace(quantization_config=config))


def _compressed_tensors_args(block: list[int]):
    """compressed-tensors' weight args for a base's per-channel or per-block FP8 scales."""
    from compressed_tensors.quantization import QuantizationArgs

    if block[0] == 1:
        return weight_args("channel")
    return QuantizationArgs(num_bits=8, type="float", strategy="block", symmetric=True,
                            dynamic=False, block_structure=list(block))


def _block_range(x: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scale block's min and max over rows ``x`` (zero-padded to whole blocks; a zero never
    changes a symmetric scale): ``(k / bh, C)`` each."""
    bh, bw = block
    k, cols = x.shape
    if bh == 1:
        return torch.aminmax(x, dim=1, keepdim=True)  # (k, 1) each
    grid = scale_grid([k, cols], block)
    padded = torch.zeros(grid[0] * bh, grid[1] * bw, dtype=x.dtype, device=x.device)
    padded[:k, :cols] = x
    blocks = padded.reshape(grid[0], bh, grid[1], bw)  # (R, bh, C, bw)
    return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))


def decode_row_set(values: torch.Tensor, scale: torch.Tensor, scheme: Literal["channel", "block"],
                   rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of a written FP8 weight as a server decodes them: float8 ``values``
    ``(k, in)`` times their scales (``scale``: the whole ``(out, 1)`` or block-grid tensor),
    float32 ``(k, in)``."""
    block = list(BLOCK) if scheme == "block" else [1, values.shape[1]]
    per_row = scale.float()[torch.div(rows, block[0], rounding_mode="floor")]  # (k, C)
    if per_row.shape[1] > 1:
        per_row = per_row.repeat_interleave(block[1], 1)[:, :values.shape[1]]  # (k, in)
    return values.float() * per_row


def weight_args(scheme: Literal["channel", "block"]):
    """compressed-tensors' ``QuantizationArgs`` of the scheme's weights (its own preset)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(PRESETS[scheme], ["Linear"]).weights


class Fp8Encoder:
    """Encodes a merged weight row block by row block as compressed-tensors FP8.

    Rows arrive float32 and are first rounded to ``dtype`` (the checkpoint's 16-bit dtype, as a
    merged model holds them); then per ``block`` (a row: ``[1, in]``; or 128x128) the scale is
    ``max|w| / 448`` and the values ``clamp(w / scale)`` in float8_e4m3fn, both computed by
    compressed-tensors itself with ``args``. Blocks must start on a multiple of
    :attr:`row_multiple`. :meth:`for_scheme` makes the ``--save-method fp8`` one.

    Args:
        scale_key: the name the scales are written as.
        shape: the weight's ``(out, in)``.
        args: compressed-tensors' ``QuantizationArgs`` of the weights.
        block: the ``[rows, cols]`` each scale covers.
        dtype: the 16-bit dtype (safetensors name) the rows are rounded to.
        scale_dtype: the scales' dtype (safetensors name).
        device: where to encode.
    """

    def __init__(self, scale_key: str, shape: list[int], args, block: list[int], dtype: str,
                 scale_dtype: str, device: torch.device) -> None:
        self.scale_key = scale_key
        self.args = args
        self.block = list(block)
        self.dtype = DTYPES[dtype]
        self.scales = torch.empty(scale_grid(shape, self.block), dtype=DTYPES[scale_dtype],
                                  device=device)

    @classmethod
    def for_scheme(cls, weight: str, shape: list[int], scheme: Literal["channel", "block"],
                   dtype: str, device: torch.device) -> Fp8Encoder:
        """``--save-method fp8``'s encoder of ``weight``: the preset's args, scales in ``dtype``
        written as ``<weight>_scale``."""
        block = list(BLOCK) if scheme == "block" else [1, shape[1]]
        return cls(scale_name(weight), shape, weight_args(scheme), block, dtype, dtype, device)

    @property
    def row_multiple(self) -> int:
        """Row blocks start on multiples of this (one scale block of rows)."""
        return self.block[0]

    def encode(self, start: int, stop: int, rows: torch.Tensor) -> torch.Tensor:
        """The float8 values of merged rows ``[start, stop)`` (float32 ``(k, in)``), on the CPU."""
        from compressed_tensors.quantization.lifecycle.forward import quantize
        from compressed_tensors.quantization.utils import calculate_qparams

        x = rows.to(self.dtype)  # (k, in), as the merged 16-bit checkpoint holds it
        low, high = _block_range(x, self.block)  # (k / bh, C) each
        scale, zero = calculate_qparams(low, high, self.args)
        self.scales[start // self.block[0]:start // self.block[0] + scale.shape[0]] = scale
        # per channel the (k, 1) scale broadcasts over each row; per block compressed-tensors
        # pads and reshapes the rows into (k / bh, C) blocks itself
        return quantize(x, scale, zero, self.args, dtype=FP8).cpu()  # fp8 (k, in)

    def siblings(self) -> dict[str, torch.Tensor]:
        """The scale tensor by name (per row ``(out, 1)``; per block the grid), on the CPU."""
        return {self.scale_key: self.scales.cpu()}


__all__ = ["Fp8Decoder", "Fp8Encoder", "TransformersFp8Encoder", "decode_row_set",
           "decode_whole", "requantizer", "scale_grid", "scale_rows", "weight_args"]
