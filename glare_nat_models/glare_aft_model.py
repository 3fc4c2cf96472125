"""Stage III of GLARE: Adaptive Feature Transformation (``network_g: GLARENet``), docs/glare.md "Stage III: AFT decoder"

Initialisation (official ``VQLLFLOWDModel``): the Stage-II checkpoint fills ``RRDB.*`` and ``flowUpsamplerNet.*``
(``path.pretrain_network_stage2``; the official code loads it with ``strict=False``, here the keys are checked
explicitly: the file must hold exactly those two prefixes of the network, any missing / unexpected /
mis-shaped key raises unless ``strict_load_stage2: false``), the frozen VQGAN comes from
``path.pretrain_network_vq``. ``RRDB``, ``flowUpsamplerNet`` and the VQGAN are frozen; only ``deformable_decoder``
(``D_MF``) trains. ``path.pretrain_network_g`` (e.g. a Stage-III checkpoint or the official ``net_G.pth`` with
``param_key_g: ~``) is loaded after the Stage-II file and therefore wins. The never-called official parameters
(``deformable_decoder.{conv_out,scale,bias,enc}``, ``flowUpsamplerNet.f``) are frozen too (they get no gradient
anyway; this keeps DistributedDataParallel from waiting for them).

``train.mf_init`` (training only, before ``pretrain_network_g`` and resume states, which win): ``random`` (default,
official) leaves ``D_MF`` as built; ``nl_decoder`` copies the frozen VQGAN decoder's weights into ``D_MF``'s
backbone (``conv_in``, ``mid``, ``up``, ``norm_out``: the same layout) and its ``conv_out`` into the output head
``residual_conv``, so ``D_MF`` starts as ``D_NL`` applied to the continuous flow output and the fusion layers learn
from there: a shortcut for short trainings (``options/study/``), not the official recipe.

Loss, on ``y_hat = clamp(GLARENet(lq), 0, 1)`` (official clamp before the losses)::

    L = pixel_opt (L1, 1) + perceptual_opt (VGG16PerceptualLoss, 0.01) + msssim_opt (MSSSIMLoss = 1 - MS-SSIM, 0.2)

Each term is optional (at least one). ``test()`` runs the full inference path (log -> E_c -> reverse flow ->
VQGAN features -> D_MF) with ``net_g_ema`` when ``train.ema_decay > 0`` and ``val.use_ema`` (default true).
Checkpoints hold ``net_g`` only (``RRDB`` + ``flowUpsamplerNet`` + ``deformable_decoder``, like the official
``net_G.pth``); the VQGAN stays a separate file.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY
from torch import nn

from glare_nat_models.base_model import GLAREBaseModel, image_loss
from glare_nat_models.checkpoint import STAGE2_PREFIXES
from glare_nat_models.glare_flow_model import setup_frozen_vqgan

__all__ = ["GLAREAFTModel", "init_mf_decoder"]


def init_mf_decoder(mf: nn.Module, vq: nn.Module, mode: str) -> None:
    """``train.mf_init`` (module docstring): ``random`` does nothing; ``nl_decoder`` copies ``vq.decoder`` into
    ``mf`` (every decoder tensor must have its same-shaped counterpart, else ValueError naming it)."""
    if mode == "random":
        return
    if mode != "nl_decoder":
        raise ValueError(f"train.mf_init = {mode!r}: expected 'random' or 'nl_decoder'")
    source = vq.decoder.state_dict()
    target = mf.state_dict()
    pairs = {k: k for k in source if not k.startswith("conv_out.")}
    pairs.update({f"conv_out.{p}": f"residual_conv.{p}" for p in ("weight", "bias")})
    bad = [k for k, t in pairs.items() if t not in target or target[t].shape != source[k].shape]
    if bad:
        raise ValueError(f"train.mf_init = 'nl_decoder': D_MF has no same-shaped counterpart of VQGAN decoder {bad}")
    with torch.no_grad():  # the listed tensors only; D_MF's fusion layers and unused tensors keep their values
        for k, t in pairs.items():
            target[t].copy_(source[k])
    get_root_logger().info(f"D_MF initialised from the VQGAN decoder ({len(pairs)} tensors, train.mf_init).")


@MODEL_REGISTRY.register()
class GLAREAFTModel(GLAREBaseModel):
    """Stage-III training / GLARE inference (see the module docstring)."""

    def build_aux_networks(self) -> None:
        self.net_vq = setup_frozen_vqgan(self)
        path_opt = self.opt["path"]
        stage2 = path_opt.get("pretrain_network_stage2")
        if stage2 is not None:
            self.load_network(
                self.net_g,
                stage2,
                path_opt.get("strict_load_stage2", True),
                path_opt.get("param_key_stage2", "params"),
                prefixes=STAGE2_PREFIXES,
            )
        elif self.is_train and path_opt.get("pretrain_network_g") is None:
            raise KeyError(
                "GLAREAFTModel training needs path.pretrain_network_stage2 (the Stage-II checkpoint) or "
                "path.pretrain_network_g: RRDB and flowUpsamplerNet are frozen in Stage III"
            )
        bare = self.get_bare_model(self.net_g)
        self.freeze(bare.RRDB, bare.flowUpsamplerNet)
        if self.is_train:
            init_mf_decoder(bare.deformable_decoder, self.net_vq, self.opt["train"].get("mf_init", "random"))

    def init_training_settings(self) -> None:
        self.setup_ema()
        self.cri_pix = self.build_optional_loss("pixel_opt")
        self.cri_perceptual = self.build_optional_loss("perceptual_opt")
        self.cri_msssim = self.build_optional_loss("msssim_opt")
        if self.cri_pix is None and self.cri_perceptual is None and self.cri_msssim is None:
            raise ValueError("train: GLAREAFTModel needs at least one of pixel_opt, perceptual_opt, msssim_opt")
        self.set_train_mode()
        self.setup_optimizers()
        self.setup_schedulers()

    def run_net(self, net: nn.Module, lq: torch.Tensor) -> torch.Tensor:
        """Raw ``GLARENet`` output (B, 3, H, W) for ``lq`` (H, W multiples of the network's ``downscale``: training
        crops are, and :meth:`test` pads)."""
        return net(lq, self.net_vq)

    def optimize_parameters(self, current_iter: int) -> None:
        self.set_train_mode()
        self.log_dict = OrderedDict()
        self.optimizer_g.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.run_net(self.net_g, self.lq)
        self.output = out.float().clamp(0, 1)
        loss_dict = OrderedDict()
        for key, cri in (("l_pix", self.cri_pix), ("l_percep", self.cri_perceptual), ("l_msssim", self.cri_msssim)):
            if cri is not None:
                loss_dict[key] = image_loss(cri, self.output, self.gt)
        stepped = self.check_finite(loss_dict, current_iter)
        if stepped:
            self.backward_and_step(sum(loss_dict.values()), self.optimizer_g, "g", current_iter)
        self.finish_step(loss_dict, stepped)

    def forward_test(self, net: nn.Module, lq: torch.Tensor) -> torch.Tensor:
        """Full GLARE inference, clamped to [0, 1] (official)."""
        return self.run_net(net, lq).clamp(0, 1)
