"""``network_g.nat2.decode.order: halton``: a fixed, spatially spread commit order for the latent NAT."""

from __future__ import annotations

import pytest
import torch

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)
from glare_nat_arch.nat_uncertainty import halton_rank
from tests.nat_helpers import K, inputs, tiny_latent_nat


@pytest.mark.parametrize("h,w", [(1, 1), (7, 9), (16, 16), (3, 40)])
def test_halton_rank_is_a_deterministic_permutation_of_the_grid(h, w):
    rank = halton_rank(h, w)
    assert rank.dtype == torch.long and rank.shape == (h * w,)
    assert torch.equal(rank.sort().values, torch.arange(h * w))
    assert torch.equal(rank, halton_rank(h, w))


def test_halton_prefixes_are_spread_over_the_grid():
    """On a 9 x 8 grid (rows x columns: 3^2 x 2^3) the first 6 positions lie one in each cell of a 3 x 2 division,
    the first 24 one in each of 3 x 8, and all 72 are visited by the first 72 Halton points (a row-major or a
    confidence order would put early positions next to each other)."""
    rank = halton_rank(9, 8).reshape(9, 8)
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(8), indexing="ij")
    for k, rows_per_cell, cols_per_cell in ((6, 3, 4), (24, 3, 1)):
        early = rank < k
        cells = {(int(r) // rows_per_cell, int(c) // cols_per_cell) for r, c in zip(rows[early], cols[early])}
        assert len(cells) == k
    i = torch.arange(72)
    row = 3 * (i % 3) + (i // 3) % 3  # floor(9 phi_3(i)) from the base-3 digits
    col = 4 * (i % 2) + 2 * ((i // 2) % 2) + (i // 4) % 2  # floor(8 phi_2(i))
    visited = row * 8 + col
    assert torch.equal(rank.reshape(-1)[visited], i)  # the rank is the Halton index itself on this grid


def test_halton_order_commits_the_earliest_halton_positions_whatever_the_confidence():
    """Each round commits exactly the masked positions of lowest Halton rank (the schedule's count is unchanged);
    the codes committed are the NAT's predictions, and never-masked codes are kept."""
    x_hat, codebook, color_map, cond = inputs()
    conf_order = tiny_latent_nat().refine(x_hat, codebook, color_map, cond)
    out = tiny_latent_nat(order="halton").refine(x_hat, codebook, color_map, cond)
    b, h, w = out["mask_init"].shape
    rank = halton_rank(h, w).reshape(h, w)
    prev = out["mask_init"]
    assert prev.any()
    for cur in out["masks"]:
        assert not (cur & ~prev).any()
        for i in range(b):
            if cur[i].any() and (prev[i] & ~cur[i]).any():
                assert rank[prev[i] & ~cur[i]].max() < rank[cur[i]].min()  # committed before every still-masked
        prev = cur
    assert [int(m.sum()) for m in out["masks"]] == [int(m.sum()) for m in conf_order["masks"]]
    assert not out["masks"][-1].any() and (out["codes"] < K).all()
    m0 = out["mask_init"]
    assert torch.equal(out["codes"][~m0], out["codes_init"][~m0])
    assert not torch.equal(out["masks"][0], conf_order["masks"][0])  # the order differs from MaskGIT's here


@pytest.mark.parametrize("other", [{"remask_scope": "all"}, {"remask_rule": "threshold"}])
def test_halton_order_refuses_rules_it_would_ignore(other):
    with pytest.raises(ValueError, match="order = 'halton'"):
        tiny_latent_nat(order="halton", **other)
