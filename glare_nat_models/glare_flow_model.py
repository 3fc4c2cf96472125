"""Stage II of GLARE: conditional encoder + invertible latent flow (``network_g: GLAREFlowNet``), trained by NLL.

Official objective (``LLFlow_model.optimize_parameters``, docs/glare.md "Stage-II objective"), per batch::

    z_NL = quant_conv(E_NL(gt))                          frozen VQGAN (network_vq), no gradient
    mu   = z_NL  with probability train_gt_ratio (0.2),  else color_map(E_c(log lq))
    z, logdet = f(z_NL; cond)
    NLL  = -(log N(z; mu, I) + logdet) / (ln 2 * h * w)  per sample (bits per latent pixel, C summed)
    L    = nll_weight (1) * mean_batch(NLL)

``train_gt_ratio`` (official 0.2; LowLevelAI/GLARE#24 notes that it contradicts the paper's "Gaussian
centred on the low-light feature" and got no author answer) is drawn once per batch with Python's ``random``
(seeded by BasicSR's ``manual_seed``). Set it to 0 for the paper's formulation.

Validation / test: ``z_hat = f^-1(color_map; cond)`` (no noise: the official inference is deterministic), then the
frozen VQGAN quantises and decodes it; the RGB output of ``D_NL``, clamped to [0, 1], is the result (as the
official ``test_stage2.py``).

Options: ``network_vq`` (the Stage-I ``GLAREVQGAN`` options, required), ``path.pretrain_network_vq`` (required;
``param_key_vq`` default ``params``, ``~`` for the official ``vqgan.pkl``, whose unused ``conv_semantic.*`` /
``vgg_feat_extractor.*`` keys are dropped; ``strict_load_vq`` default true), ``train.train_gt_ratio`` (0.2),
``train.nll_weight`` (1.0) and everything of :class:`~glare_nat_models.base_model.GLAREBaseModel`.
On resume, BasicSR would look for ``models/net_vq_<iter>.pth`` (never saved: the VQGAN is frozen), so the YAMLs
list ``network_vq`` in ``path.ignore_resume_networks``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from copy import deepcopy

import torch
from basicsr.archs import build_network
from basicsr.utils.registry import MODEL_REGISTRY
from torch import nn

from glare_nat_arch.vqgan_arch import VQGAN_UNUSED_PREFIXES
from glare_nat_models.base_model import GLAREBaseModel
from glare_nat_models.checkpoint import CheckpointError

__all__ = ["GLAREFlowModel", "setup_frozen_vqgan"]


def setup_frozen_vqgan(model: GLAREBaseModel) -> nn.Module:
    """Build ``network_vq``, load ``path.pretrain_network_vq`` strictly and freeze it (eval, no grad, no optimizer).

    Raises:
        KeyError: ``network_vq`` or ``path.pretrain_network_vq`` is missing.
        CheckpointError / StrictLoadError: the file is unreadable or does not match (message names the file).
    """
    opt = model.opt
    if "network_vq" not in opt:
        raise KeyError(f"{type(model).__name__} needs a 'network_vq' section (the Stage-I GLAREVQGAN options)")
    path_opt = opt["path"]
    load_path = path_opt.get("pretrain_network_vq")
    if load_path is None:
        raise KeyError(
            f"{type(model).__name__} needs path.pretrain_network_vq (the trained Stage-I VQGAN; "
            "a random codebook would make the model meaningless)"
        )
    net_vq = build_network(deepcopy(opt["network_vq"])).to(model.device)
    try:
        model.load_network(
            net_vq,
            load_path,
            path_opt.get("strict_load_vq", True),
            path_opt.get("param_key_vq", "params"),
            drop_prefixes=VQGAN_UNUSED_PREFIXES,
        )
    except CheckpointError as e:
        if path_opt.get("resume_state"):
            raise CheckpointError(
                f"{e}\nWhile resuming, BasicSR replaces pretrain_network_vq by models/net_vq_<iter>.pth, which is "
                "never saved (the VQGAN is frozen): add network_vq to path.ignore_resume_networks."
            ) from e
        raise
    model.print_network(net_vq)
    return model.freeze_network(net_vq)


@MODEL_REGISTRY.register()
class GLAREFlowModel(GLAREBaseModel):
    """Stage-II training of ``GLAREFlowNet`` against a frozen VQGAN (see the module docstring)."""

    def build_aux_networks(self) -> None:
        self.net_vq = setup_frozen_vqgan(self)

    def init_training_settings(self) -> None:
        train_opt = self.opt["train"]
        self.train_gt_ratio = float(train_opt.get("train_gt_ratio", 0.2))
        if not 0.0 <= self.train_gt_ratio <= 1.0:
            raise ValueError(f"train.train_gt_ratio must be in [0, 1], got {self.train_gt_ratio}")
        self.nll_weight = float(train_opt.get("nll_weight", 1.0))
        self.setup_ema()
        self.set_train_mode()
        self.setup_optimizers()
        self.setup_schedulers()

    def optimize_parameters(self, current_iter: int) -> None:
        self.set_train_mode()
        self.log_dict = OrderedDict()
        self.optimizer_g.zero_grad(set_to_none=True)
        with torch.no_grad():  # the NLL target in float32 outside autocast, as the official LLFlow_model
            gt_latent = self.net_vq.encode(self.gt.float())
        mu_from_gt = random.random() < self.train_gt_ratio
        with self.autocast():
            out = self.net_g(gt_latent, self.lq, mu_from_gt=mu_from_gt)
        loss_dict = OrderedDict(l_nll=self.nll_weight * out["nll"].float().mean())
        stepped = self.check_finite(loss_dict, current_iter)
        if stepped:
            self.backward_and_step(loss_dict["l_nll"], self.optimizer_g, "g", current_iter)
        loss_dict["logdet"] = out["logdet"].detach().float().mean()
        loss_dict["mu_from_gt"] = torch.tensor(float(mu_from_gt), device=self.device)
        self.finish_step(loss_dict, stepped)

    def forward_test(self, net: nn.Module, lq: torch.Tensor) -> torch.Tensor:
        """Reverse flow from ``mu`` -> VQGAN quantise + decode (:meth:`~glare_nat_arch.glare_arch.GLAREFlowNet.
        enhance`): RGB (B, 3, H, W) in [0, 1]."""
        return self.get_bare_model(net).enhance(lq, self.net_vq).clamp(0, 1)
