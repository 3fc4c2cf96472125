"""Vector quantiser of GLARE's Stage-I VQGAN (taming ``VectorQuantizer2`` with ``legacy=False``, no EMA).

State-dict key: ``embedding.weight`` (n_e, e_dim), as in the official ``quantize.embedding.weight``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import Tensor, nn

__all__ = ["VectorQuantizer", "autocast_off", "squared_code_distances", "chunked_code_distances"]


def autocast_off(device_type: str):
    """A context that disables autocast on ``device_type`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def squared_code_distances(rows: Tensor, codes: Tensor, code_sq: Tensor) -> Tensor:
    """The official squared L2 ``|z|^2 + |e|^2 - 2 z.e`` (N x K) of ``rows`` (N x d) to ``codes`` (K x d), with
    ``code_sq`` = ``|e|^2`` (K). Call it with autocast off and inputs in at least float32: the one distance of the
    quantiser and of the NAT's code distribution, so both pick the same nearest code (first index on exact ties)
    wherever float rounding cannot tip a near-tie (row blocks of other sizes may round differently, see
    :func:`chunked_code_distances`)."""
    return (rows**2).sum(dim=1, keepdim=True) + code_sq - 2 * rows @ codes.t()


def chunked_code_distances(rows: Tensor, codes: Tensor, chunk: int) -> Iterator[tuple[int, Tensor]]:
    """:func:`squared_code_distances` of ``rows`` (N x d) to ``codes`` (K x d), ``chunk`` rows at a time.

    Yields ``(start, dist)`` with ``dist`` (n x K, n <= chunk) the distances of ``rows[start : start + n]``: the same
    operations in the same order as :func:`squared_code_distances`, so the same values up to float rounding (BLAS
    libraries may pick another kernel for another row count: MKL's results then differ in the last bit), and the
    same nearest codes wherever two codes are not within that rounding of a tie. Every chunk is written into
    two buffers allocated once instead of fresh ``chunk x K`` tensors (on CPU a fresh 32 MiB block is above glibc's
    mmap threshold, so the OS maps and zeroes it again each time): distances plus top-64 of 15,000 rows against 8192
    codes took 1.16-1.25 s with fresh blocks and 0.74-0.78 s with the buffers (2 threads). ``dist`` is overwritten
    by the next step: consume it (or copy what you keep) before advancing.
    Call it with autocast off and without autograd (``out=`` operations).
    """
    n, k = rows.shape[0], codes.shape[0]
    size = max(1, min(int(chunk), n))
    code_sq = (codes**2).sum(dim=1)
    codes_t = codes.t()
    sums, prods = rows.new_empty(size, k), rows.new_empty(size, k)
    for start in range(0, n, size):
        part = rows[start : start + size]
        s, p = sums[: part.shape[0]], prods[: part.shape[0]]
        torch.add((part**2).sum(dim=1, keepdim=True), code_sq, out=s)
        torch.mm(2 * part, codes_t, out=p)
        yield start, s.sub_(p)


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with a straight-through estimator.

    Args:
        n_e: number of codes K.
        e_dim: code dimension (the latent channel count).
        beta: commitment weight: ``loss = beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2`` (both terms are means).
        max_chunk_elems: at most this many distance entries (rows x K) are built at once, so a large image
            never allocates its whole N x K distance matrix (N = B*h*w).

    The distance is the official squared L2 ``|z|^2 + |e|^2 - 2 z.e`` followed by argmin (first index on ties),
    computed in at least float32 with autocast off (the official code, run under autocast, would compute it in
    fp16 on a GPU). Codebook init: uniform(-1/K, 1/K).
    """

    def __init__(self, n_e: int, e_dim: int, beta: float = 0.25, max_chunk_elems: int = 1 << 24):
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.max_chunk_elems = max_chunk_elems
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    @torch.no_grad()
    def nearest_indices(self, z: Tensor) -> Tensor:
        """Code indices of the nearest codebook vectors: z (B, e_dim, h, w) -> (B, h, w) int64."""
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.e_dim}, h, w) latents, got {tuple(z.shape)}")
        b, _, h, w = z.shape
        dtype = torch.promote_types(z.dtype, torch.float32)  # never fp16/bf16 distances (8192 close codes)
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.e_dim).to(dtype)
        codes = self.embedding.weight.detach().to(dtype)
        rows = max(1, self.max_chunk_elems // self.n_e)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        with autocast_off(flat.device.type):
            for start, dist in chunked_code_distances(flat, codes, rows):  # chunks of rows, not a loop over tokens
                torch.argmin(dist, dim=1, out=out[start : start + dist.shape[0]])
        return out.view(b, h, w)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors of ``indices``: (B, h, w) int64 -> (B, e_dim, h, w)."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantise z (B, e_dim, h, w).

        Returns ``(z_q, loss, indices)``: z_q (B, e_dim, h, w) with straight-through gradients to z,
        the scalar codebook + commitment loss, and indices (B, h, w) int64.
        """
        indices = self.nearest_indices(z)
        z_q = self.lookup(indices).to(z.dtype)
        loss = self.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
        z_q = z + (z_q - z).detach()
        return z_q, loss, indices
