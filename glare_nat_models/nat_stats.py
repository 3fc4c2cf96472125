"""NAT-II validation statistics (docs/nat.md "Validation statistics"): token accuracies, AUROC of the uncertainty
and the oracle PSNRs, accumulated over validation images and written as JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from os import path as osp
from typing import Any

import torch
from torch import Tensor

from glare_nat_models.checkpoint import atomic_write_text

__all__ = ["binary_auroc", "NATValStats", "write_nat_stats"]


def binary_auroc(scores: Tensor, labels: Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` predicting boolean ``labels`` (Mann-Whitney, ties count half).

    Returns None when one class is absent (AUROC undefined).
    """
    s = scores.reshape(-1).double()
    y = labels.reshape(-1).bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based mean rank of each distinct value
    rank_sum = avg_rank[inverse][y].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


class NATValStats:
    """Accumulates NAT-II token statistics over validation images (docs/nat.md "Validation statistics").

    Per image: flow codes ``v0``, NAT codes ``v^T``, teacher codes ``y``, initial mask ``M0`` and entropy ``H``
    (``B x h x w``). :meth:`summary` gives a flat dict: counts, ``masked_frac`` = |M0| / N, token accuracies of the
    flow and NAT codes on M0 (``acc_flow_masked``, ``acc_nat_masked``) and everywhere (``acc_flow_all``,
    ``acc_nat_all``), ``auroc_entropy`` = AUROC(H -> [v0 != y]) over all positions (None if undefined) and
    ``auroc_score``, the same for the uncertainty that masks (``nat2.uncertainty.source``; equal to
    ``auroc_entropy`` for the default ``entropy``), and the mean PSNR of every image set given to :meth:`add_psnr`
    as ``psnr_<name>`` (the oracle rows of docs/nat.md "Validation statistics").
    """

    def __init__(self) -> None:
        self.n_images = 0
        self.counts = {"pos": 0, "masked": 0, "flow_ok_m": 0, "nat_ok_m": 0, "flow_ok": 0, "nat_ok": 0}
        self.entropy: list[Tensor] = []
        self.score: list[Tensor] = []
        self.wrong: list[Tensor] = []
        self.psnr: dict[str, list[float]] = {}

    def add_psnr(self, name: str, output: Tensor, gt: Tensor) -> None:
        """Per-image PSNR ``10 log10(1 / MSE)`` of ``output`` (clamped to [0, 1]) against ``gt`` (``B x 3 x H x W``
        floats in [0, 1]; float64, no rounding) under ``psnr_<name>``."""
        if output.shape != gt.shape:
            raise ValueError(f"NATValStats.add_psnr({name!r}): output {tuple(output.shape)} vs gt {tuple(gt.shape)}")
        mse = (output.double().clamp(0, 1) - gt.double()).pow(2).flatten(1).mean(1)
        self.psnr.setdefault(name, []).extend((10 * torch.log10(1 / mse)).tolist())

    def update(
        self, v0: Tensor, v_nat: Tensor, y: Tensor, mask0: Tensor, entropy: Tensor, score: Tensor | None = None
    ) -> None:
        """All ``B x h x w``: flow codes, NAT codes, teacher codes, initial mask, flow entropy and (default: the
        entropy) the uncertainty score that masked."""
        flow_ok, nat_ok = v0 == y, v_nat == y
        c = self.counts
        c["pos"] += y.numel()
        c["masked"] += int(mask0.sum())
        c["flow_ok_m"] += int((flow_ok & mask0).sum())
        c["nat_ok_m"] += int((nat_ok & mask0).sum())
        c["flow_ok"] += int(flow_ok.sum())
        c["nat_ok"] += int(nat_ok.sum())
        self.n_images += y.shape[0]
        self.entropy.append(entropy.detach().float().reshape(-1).cpu())
        self.score.append((entropy if score is None else score).detach().float().reshape(-1).cpu())
        self.wrong.append((~flow_ok).reshape(-1).cpu())

    def summary(self) -> dict[str, float | int | None]:
        c = self.counts

        def ratio(a: int, b: int) -> float | None:
            return a / b if b else None

        wrong = torch.cat(self.wrong) if self.wrong else None
        auroc = binary_auroc(torch.cat(self.entropy), wrong) if self.entropy else None
        auroc_score = binary_auroc(torch.cat(self.score), wrong) if self.score else None
        return {
            "n_images": self.n_images,
            "n_positions": c["pos"],
            "n_masked": c["masked"],
            "masked_frac": ratio(c["masked"], c["pos"]),
            "acc_flow_masked": ratio(c["flow_ok_m"], c["masked"]),
            "acc_nat_masked": ratio(c["nat_ok_m"], c["masked"]),
            "acc_flow_all": ratio(c["flow_ok"], c["pos"]),
            "acc_nat_all": ratio(c["nat_ok"], c["pos"]),
            "auroc_entropy": auroc,
            "auroc_score": auroc_score,
            **{f"psnr_{name}": sum(v) / len(v) for name, v in self.psnr.items()},
        }


def write_nat_stats(root: str, stats: Mapping[str, Any], current_iter: Any) -> str:
    """``<root>/nat_val_stats_<iter>.json`` and ``nat_val_stats_latest.json`` (each written atomically); returns the
    first path."""
    os.makedirs(root, exist_ok=True)
    text = json.dumps(dict(stats), indent=2) + "\n"
    target = osp.join(root, f"nat_val_stats_{current_iter}.json")
    for name in (target, osp.join(root, "nat_val_stats_latest.json")):
        atomic_write_text(name, text)
    return target
