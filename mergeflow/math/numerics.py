"""Fast whole-tensor checks. ``torch.isfinite(t).all()`` builds a boolean tensor as large as
``t`` and is slow on CPUs without native bf16; these give the same answers for less."""

from __future__ import annotations

import math

import torch

# 16-bit floats: a value is NaN or Inf exactly when all its exponent bits are set.
_EXPONENT_MASK = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf (non-float tensors always are)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    mask = _EXPONENT_MASK.get(tensor.dtype)
    if mask is not None:
        bits = tensor.contiguous().view(torch.int16) & mask  # sign bit cleared: values >= 0
        return int(bits.max()) != mask
    if tensor.dtype == torch.float8_e4m3fn:  # no Inf; NaN is every exponent and mantissa bit
        return int((tensor.contiguous().view(torch.uint8) & 0x7F).max()) != 0x7F
    if tensor.dtype in (torch.float32, torch.float64):
        # NaN and Inf propagate through a sum, so a finite sum proves every element finite;
        # a non-finite sum may be an overflow of finite values, so then ask exactly.
        return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())
    return bool(torch.isfinite(tensor).all())


def fits(work: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when a float32 tensor has no NaN/Inf and casting it to ``dtype`` cannot overflow,
    decided by one ``aminmax`` pass (NaN propagates through it). False means "maybe not":
    ask :func:`all_finite` on the cast result then."""
    if work.numel() == 0 or not dtype.is_floating_point:
        return True
    low, high = torch.aminmax(work)
    low, high = float(low), float(high)
    bound = torch.finfo(dtype).max
    return math.isfinite(low) and math.isfinite(high) and -bound <= low and high <= bound
