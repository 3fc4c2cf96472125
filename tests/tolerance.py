"""One rule for comparing floating-point results that two different computations produce.

Exact equality holds only by construction: integer results (code indices, masks), pure data movement (crop,
pad, permute, state-dict round trips) and the very same operation on the same shapes with the same thread count.
Anything else (a chunked against a one-shot product, another kernel, another summation order) may differ in the
last bits, and BLAS / oneDNN pick their kernels by CPU and by shape. The bound used here is the textbook one for
a sum of ``n`` rounded terms, ``|err| <= n * eps * sum(|terms|)``, with a safety factor: a reduction of length
``reduction`` whose terms are at most ``scale`` in magnitude is compared with
``atol = SAFETY * eps(dtype) * reduction * scale`` (``scale`` defaults to the largest ``|expected|``).
"""

from __future__ import annotations

import torch

SAFETY = 4.0


def float_atol(dtype: torch.dtype, reduction: int, scale: float) -> float:
    """Absolute tolerance for two computations of a length-``reduction`` sum of terms up to ``scale``."""
    return SAFETY * torch.finfo(dtype).eps * max(1, reduction) * float(scale)


def assert_close_for(
    actual: torch.Tensor, expected: torch.Tensor, *, reduction: int, scale: float | None = None
) -> None:
    """``actual`` equals ``expected`` up to the rounding of a length-``reduction`` reduction in their dtype."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if scale is None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
    atol = float_atol(expected.dtype, reduction, scale)
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=atol)
