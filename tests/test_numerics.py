"""The whole-tensor checks of :mod:`mergeflow.math.numerics`, against ``torch.isfinite``, for
every float dtype a merge writes and every non-finite value a block can hold."""

from __future__ import annotations

import pytest
import torch

from mergeflow.math.numerics import all_finite, fits

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
SPECIALS = [float("nan"), -float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite_agrees_with_isfinite(dtype):
    finfo = torch.finfo(dtype)
    finite = torch.tensor([0.0, -0.0, finfo.max, -finfo.max, finfo.tiny, -finfo.tiny,
                           finfo.smallest_normal / 4], dtype=dtype)  # extremes and a subnormal
    assert all_finite(finite) and bool(torch.isfinite(finite).all())
    for special in SPECIALS:
        for at in (0, 3, 6):  # first, middle, last
            bad = finite.clone()
            bad[at] = special
            assert not all_finite(bad), (dtype, special, at)
            assert not all_finite(bad.reshape(7, 1).T)  # a non-contiguous view too


def test_all_finite_of_empty_integer_and_fp8_tensors():
    assert all_finite(torch.empty(0, dtype=torch.bfloat16))
    assert all_finite(torch.tensor([1, 2], dtype=torch.int64))
    fp8 = torch.tensor([448.0, -448.0, 0.0]).to(torch.float8_e4m3fn)
    assert all_finite(fp8)
    assert not all_finite(torch.tensor([float("nan"), 1.0]).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_value_that_overflows_the_cast_is_caught_after_it(dtype):
    """The merge checks a block as cast: a float32 value past the 16-bit range casts to Inf."""
    big = torch.tensor([1.0, torch.finfo(dtype).max * 2.0])
    assert not fits(big, dtype)
    assert not all_finite(big.to(dtype))
    assert all_finite(torch.tensor([1.0, -2.0]).to(dtype)) and fits(torch.tensor([1.0]), dtype)
