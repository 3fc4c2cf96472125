"""The shared tolerance helper (tests/tolerance.py): it absorbs kernel rounding and nothing more."""

from __future__ import annotations

import pytest
import torch

from tests.tolerance import assert_close_for, assert_same_codes, code_distance_tolerance, tolerance


def test_tolerance_scales_with_dtype_and_reduction_length():
    assert tolerance(torch.float32) == pytest.approx(8 * 2.0**-23)
    assert tolerance(torch.float64, 64, layers=2) == pytest.approx(8 * 2.0**-52 * 8 * 2)
    with pytest.raises(ValueError, match="reduction"):
        tolerance(torch.float32, 0)


def test_assert_close_for_accepts_a_few_ulp_and_rejects_real_errors():
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    ulp = torch.nextafter(x, torch.full_like(x, float("inf")))
    assert_close_for(ulp, x, reduction=1)  # 1 ulp
    assert_close_for(x + 1e-6, x, reduction=64)  # 8 ulp at |x| ~ 1, reduction 64
    with pytest.raises(AssertionError):
        assert_close_for(x * (1 + 1e-4), x, reduction=64)
    with pytest.raises(AssertionError):
        assert_close_for(x.double() + 1e-12, x.double(), reduction=64)  # float64: far tighter


def test_assert_same_codes_allows_near_ties_only():
    book = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [4.0, 0, 0]])
    rows = torch.tensor([[0.1, 0, 0], [0.5, 0, 0], [3.9, 0, 0], [0.9, 0, 0]])  # row 1: an exact tie of codes 0, 1
    dist = torch.cdist(rows, book).square()
    tol = code_distance_tolerance(rows, book)
    ref = torch.tensor([0, 0, 2, 1])
    decided = assert_same_codes(torch.tensor([0, 1, 2, 1]), ref, dist, tol, min_decided=0.75)  # the tie: either
    assert decided.tolist() == [True, False, True, True]
    with pytest.raises(AssertionError, match="decided positions pick other codes"):
        assert_same_codes(torch.tensor([1, 0, 2, 1]), ref, dist, tol, min_decided=0.75)
    with pytest.raises(AssertionError, match="off the nearest"):
        assert_same_codes(torch.tensor([0, 2, 2, 1]), ref, dist, tol, min_decided=0.75)  # not even close
    with pytest.raises(AssertionError, match="no teeth"):
        assert_same_codes(ref, ref, dist, tol, min_decided=1.0)
    # a latent that may move by 0.05 per element: its two nearest distances may move by about 0.1, more than its
    # gap of 0.02 (undecided) and less than half the gap of 0.8 of rows 0 and 3 (decided)
    loose = code_distance_tolerance(torch.tensor([[0.49, 0, 0]]), book, rows_tol=0.05)
    assert 0.02 < loose < 0.4
