"""Tolerances for floating-point results that reach the same value along different paths.

Exact equality holds only by construction: integer results, pure data movement (copy, crop, pad, permute, cat,
state-dict round trips) and the very same op on the same shapes and thread count (the same function called twice).
Anything else (another chunking, another kernel, another formula, another CPU) may round differently: BLAS
libraries pick kernels by shape and CPU (MKL switches kernels by row count), and vectorised and scalar loops
differ in the last bit. Those comparisons go through this module.

Model: a float result that accumulates ``n`` terms carries a rounding error of a few ``eps * sqrt(n)`` times the
size of the terms (rounding errors add up like a random walk; the worst case ``n * eps`` is far too pessimistic),
and the errors of ``layers`` successive operations add up to first order::

    rtol = SAFETY * eps(dtype) * sqrt(reduction) * layers
    atol = rtol * scale

``scale`` is the size of the terms: by default the largest ``|expected|``, which also covers the elements near
zero where terms cancelled. Discrete results derived from floats (nearest-code indices, top-k choices) can only be
identical where the float values separate the candidates by more than the tolerance of both paths:
:func:`assert_same_codes`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "SAFETY",
    "tolerance",
    "assert_close_for",
    "code_distance_scale",
    "code_distance_tolerance",
    "assert_same_codes",
]

#: Safety factor over the ``eps * sqrt(n)`` error model. Differences between kernels are a few ulp (MKL's chunked
#: and one-shot code distances differ by 1 ulp on an AVX-512 CPU); 8 leaves room for that without hiding a real
#: error, which is orders of magnitude larger.
SAFETY = 8.0


def tolerance(dtype: torch.dtype, reduction: int = 1, layers: int = 1) -> float:
    """Relative tolerance ``SAFETY * eps(dtype) * sqrt(reduction) * layers`` (see the module docstring)."""
    if reduction < 1 or layers < 1:
        raise ValueError(f"reduction and layers must be >= 1, got {reduction}, {layers}")
    return SAFETY * torch.finfo(dtype).eps * math.sqrt(reduction) * layers


def assert_close_for(
    actual: Tensor,
    expected: Tensor,
    *,
    reduction: int,
    layers: int = 1,
    scale: float | None = None,
    dtype: torch.dtype | None = None,
    msg: str | None = None,
) -> None:
    """``assert_close`` with a tolerance derived from the dtype and the reduction length.

    Args:
        actual, expected: same shapes; compared in ``dtype`` precision (default: the coarser of the two dtypes).
        reduction: the longest sum behind one element (e.g. ``C_in * k * k`` of a convolution, 1 for an
            element-wise op).
        layers: number of rounding operations in sequence between the two paths' common inputs and the result.
        scale: size of the terms (default: the largest ``|expected|``, at least 1e-30).
    """
    if dtype is None:
        dtype = actual.dtype if torch.finfo(actual.dtype).eps >= torch.finfo(expected.dtype).eps else expected.dtype
    rtol = tolerance(dtype, reduction, layers)
    if scale is None:
        scale = max(float(expected.detach().abs().max()) if expected.numel() else 0.0, 1e-30)
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), rtol=rtol, atol=rtol * scale, msg=msg
    )


def code_distance_scale(rows: Tensor, codebook: Tensor) -> Tensor:
    """Size ``N`` of the terms of the squared distances ``|z|^2 + |e|^2 - 2 z.e`` of ``rows`` (``N x d``) to
    ``codebook`` (``K x d``): ``|z|^2 + max |e|^2`` (the distance itself may be far smaller: cancellation)."""
    rows, codebook = rows.detach().double(), codebook.detach().double()
    return (rows**2).sum(1) + (codebook**2).sum(1).max()


def code_distance_tolerance(rows: Tensor, codebook: Tensor, rows_tol: float = 0.0, k: int = 1) -> Tensor:
    """Per-row tolerance ``N`` of those squared distances computed in ``promote(rows.dtype, float32)`` as the
    quantiser does (each sums ``d + 2`` terms of size :func:`code_distance_scale`), for the ``k + 1`` nearest codes.

    ``rows_tol``: the two paths' rows themselves may differ by up to this much per element (e.g. latents of a
    streamed and a whole-map encoder). To first order that moves the distance to code ``e`` by at most
    ``2 |z - e|_1 rows_tol``, and for the ``k + 1`` nearest codes ``|z - e|_1 <= sqrt(d * dist_(k+1))``.
    """
    dtype = torch.promote_types(rows.dtype, torch.float32)
    tol = tolerance(dtype, rows.shape[1] + 2) * code_distance_scale(rows, codebook)
    if rows_tol:
        rows64, book64 = rows.detach().double(), codebook.detach().double()
        near = torch.cdist(rows64, book64).square().topk(min(k + 1, book64.shape[0]), largest=False).values[:, -1]
        tol = tol + 2 * (rows.shape[1] * near).sqrt() * rows_tol + rows.shape[1] * rows_tol**2
    return tol


def assert_same_codes(
    actual: Tensor,
    expected: Tensor,
    distances: Tensor,
    tol: Tensor | float,
    min_decided: float = 0.9,
) -> Tensor:
    """Indices of the ``k`` nearest codes from two paths agree wherever the distances decide them.

    Args:
        actual, expected: ``... x k`` (or ``...`` for ``k = 1``) int64 code indices, nearest first.
        distances: ``... x K`` reference distances of every position to every code (a third computation is fine:
            all of them are within ``tol`` of the exact values).
        tol: per-position (``...``) or scalar tolerance of each path's distances.
        min_decided: the smallest fraction of positions that must be decided (else the check has no teeth).

    A position is decided when its ``k + 1`` smallest distances are more than ``2 * tol`` apart: any two paths
    within ``tol`` then rank them alike, and ``actual`` must equal ``expected`` there. Elsewhere (near-ties)
    either code is right: ``actual``'s codes must be within ``2 * tol`` of the ``k`` smallest distances.
    Returns the bool mask ``...`` of decided positions.
    """
    single = actual.dim() == distances.dim() - 1
    if single:
        actual, expected = actual[..., None], expected[..., None]
    k, n_codes = actual.shape[-1], distances.shape[-1]
    assert actual.shape == expected.shape and actual.shape[:-1] == distances.shape[:-1], (
        actual.shape,
        expected.shape,
        distances.shape,
    )
    dist = distances.detach().double().reshape(-1, n_codes)
    act, exp = actual.reshape(-1, k), expected.reshape(-1, k)
    tol = torch.as_tensor(tol, dtype=torch.float64).expand(actual.shape[:-1]).reshape(-1, 1)
    smallest = dist.topk(min(k + 1, n_codes), dim=1, largest=False).values
    decided = (smallest.diff(dim=1) > 2 * tol).all(1)
    bad = decided & (act != exp).any(1)
    assert not bad.any(), f"{int(bad.sum())} decided positions pick other codes: {act[bad][:5]} vs {exp[bad][:5]}"
    off = (dist.gather(1, act) - smallest[:, :k]).abs()
    far = off > 2 * tol
    assert not far.any(), f"codes off the nearest by {float(off.max()):.3e} (2 x tolerance {float(tol.max()):.3e})"
    frac = float(decided.double().mean()) if decided.numel() else 1.0
    assert frac >= min_decided, f"only {frac:.1%} of the positions are decided: the comparison has no teeth"
    return decided.reshape(actual.shape[:-1])
