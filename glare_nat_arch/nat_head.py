"""Pieces shared by the NAT refiners: the tied MLM head, the masked cross-entropy and the calibrated-scalar buffers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["masked_ce_loss", "MLMHead", "nan_or"]


def masked_ce_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None, label_smoothing: float = 0.1) -> Tensor:
    """Label-smoothed cross-entropy averaged over masked positions only (docs/nat.md "Training the latent NAT").

    Args:
        logits: ``N_q x K`` logits at the masked positions (as returned by :meth:`LatentNAT.logits`), or,
            when ``mask`` is given, dense ``B x h x w x K`` (or ``B x N x K``) logits.
        targets: ``N_q`` target codes, or dense ``B x h x w`` (``B x N``) when ``mask`` is given.
        mask: optional bool ``B x h x w`` (``B x N``); only its True positions contribute.
        label_smoothing: ``eps``; the target is ``(1 - eps) onehot + eps / K``.

    Returns:
        Scalar loss (0, still attached to ``logits``, when nothing is masked).
    """
    if mask is not None:
        if mask.shape != targets.shape or logits.shape[:-1] != mask.shape:
            raise ValueError(
                f"masked_ce_loss: logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask "
                f"{tuple(mask.shape)} disagree"
            )
        logits, targets = logits[mask], targets[mask]
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"masked_ce_loss: need N x K logits and N targets, got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)


class MLMHead(nn.Module):
    """``Linear -> GELU -> LN``, then logits ``g @ table.T + bias`` (table tied to the token embedding).

    Input ``N_q x d`` hidden states and the ``K x d`` table; output ``N_q x K``.
    """

    def __init__(self, dim: int, num_codes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(num_codes))

    def forward(self, hidden: Tensor, table: Tensor, out: Tensor | None = None) -> Tensor:
        """``out``: an ``N_q x K`` buffer to write the logits into (inference: no autograd through ``out=``)."""
        g = self.norm(self.act(self.fc(hidden)))
        bias, weight = self.bias.to(g.dtype), table.t().to(g.dtype)
        if out is not None:
            return torch.addmm(bias, g, weight, out=out)
        return torch.addmm(bias, g, weight)  # one N_q x K allocation


def nan_or(value: float | None) -> Tensor:
    """A float64 scalar buffer value: ``value``, or NaN (= not calibrated yet) for None."""
    return torch.tensor(float("nan") if value is None else float(value), dtype=torch.float64)
