"""MXFP4 experts (gpt-oss), decoded one expert at a time by transformers' own conversion.

A packed expert tensor ``X_blocks`` ``(E, out, G, 16)`` + ``X_scales`` ``(E, out, G)`` is what the
model holds as ``X`` ``(E, in, out)`` (:mod:`mergeflow.model.mxfp4`). transformers'
``convert_moe_packed_tensors`` decodes and transposes it, in the model's dtype, exactly as it
loads the model the adapter was trained on; it is run here on one expert's slab at a time (a
``1/E`` of the tensor), so memory is bounded by one decoded expert, never the whole tensor. The
merge asks for rows either as whole experts (``(E, in, out)``, no LoRA on the experts) or as
rows of ``(E * in, out)`` (the experts' rows one after the other, as the LoRA of a
``target_parameters`` adapter is merged); the last decoded expert is kept for the next block.
"""

from __future__ import annotations

import torch

from mergeflow.model.checkpoint import DTYPES, Checkpoint
from mergeflow.model.quant import QuantSpec


def decode_experts(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed experts ``(k, out, G, 16)`` with their scales ``(k, out, G)`` decoded as the model
    holds them: ``(k, in, out)`` in ``dtype`` (transformers' own conversion)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


class Mxfp4Decoder:
    """Decodes one MXFP4 unit for the merge, expert by expert.

    Args:
        spec: the unit (``spec.shape``: ``(E, in, out)``).
        base: the base checkpoint.
        device: where to decode.
        row_shape: the rows the merge asks for: ``(E, in, out)`` (whole experts) or
            ``(E * in, out)``.
    """

    def __init__(self, spec: QuantSpec, base: Checkpoint, device: torch.device,
                 row_shape: list[int]) -> None:
        self.spec = spec
        self.base = base
        self.device = device
        self.whole_experts = len(row_shape) == 3
        self.dtype = DTYPES[spec.dtype]
        self._cached: tuple[int, torch.Tensor] | None = None

    def expert(self, e: int) -> torch.Tensor:
        """Expert ``e`` decoded, ``(in, out)`` in the model's dtype, on the device."""
        if self._cached is not None and self._cached[0] == e:
            return self._cached[1]
        blocks = self.base.read_rows(self.spec.weight, e, e + 1).to(self.device)  # (1, out, G, 16)
        scales = self.base.read_rows(self.spec.siblings["scales"], e, e + 1).to(self.device)
        decoded = decode_experts(blocks, scales, self.dtype)[0]  # (in, out)
        self._cached = (e, decoded)
        return decoded

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` in the merge's row shape, float32 on the device: experts
        ``(k, in, out)``, or rows of ``(E * in, out)`` as ``(k, out)``."""
        if self.whole_experts:
            return torch.stack([self.expert(e).float() for e in range(start, stop)])
        per = self.spec.shape[1]
        parts, row = [], start
        while row < stop:  # the experts' rows, one expert after the other
            e, i = divmod(row, per)
            n = min(stop - row, per - i)
            parts.append(self.expert(e)[i:i + n].float())  # (n, out)
            row += n
        return torch.cat(parts)


def decode_whole(spec: QuantSpec, tensors: dict[str, torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """A whole MXFP4 unit decoded, float32 ``(E, in, out)``, from its stored tensors by key."""
    blocks = tensors[spec.weight].to(device)
    scales = tensors[spec.siblings["scales"]].to(device)
    return decode_experts(blocks, scales, DTYPES[spec.dtype]).float()


__all__ = ["Mxfp4Decoder", "decode_experts", "decode_whole"]
