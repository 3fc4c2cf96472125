"""NAT refiner models (docs/nat.md): latent NAT training (Stage II) and Stage III with both NATs.

:class:`GLARENATModel` (``network_g: GLARENATFlowNet``) trains NAT-II on top of a frozen Stage II::

    x_hat, cond, color_map = flow^-1(E_c(log lq))                 frozen (path.pretrain_network_stage2)
    y   = nearest codes of quant_conv(E_NL(gt))                     frozen VQGAN (teacher codes)
    v0, H = nearest codes / normalised entropy of x_hat (top-knn, dist_temp)
    M   = top-m of beta * H + Gumbel, m = max(1, round(r N)), r ~ U(r_min, r_max)   (train.nat2)
    V   = [MASK] on M, v0 elsewhere (y with probability p_gt_visible); optional unroll
    L   = CE_eps(NAT(V, cond)[M], y[M])  (+ lambda_vis * CE on visible positions)

``dist_temp`` / ``tau`` set to ``auto`` are calibrated on the images of ``datasets.<train.nat2.calib_dataset>``
(default ``val``, the held-out training pairs; at most ``calib_max_images``) before the first iteration, or on the
first training batch when that dataset is not configured; the values are logged and kept in the NAT's buffers, so
they are saved with every checkpoint. Validation runs the stock image metrics on the Stage-II output with NAT-II
(NAT-refined codes through the VQGAN decoder) and logs token statistics (:class:`NATValStats`) to the logger and to
``<experiments_root>/nat_val_stats_<iter>.json`` (plus ``nat_val_stats_latest.json``).

:class:`GLARENATAFTModel` (``network_g: GLARENATNet``) is :class:`GLAREAFTModel` with the NATs: NAT-II frozen
(``path.pretrain_network_nat2``), ``D_MF`` and NAT-III trained with the Stage-III losses plus
``lambda_mfm * L_mfm`` (masked feature modelling against an EMA teacher, docs/nat.md), NAT-III in its own
optimizer group (``train.nat3.lr``, ``train.nat3.warmup``), random extra NAT-III masks in training
(``train.nat3.train_random_r_max``), ``tau3: auto`` calibrated like ``tau``.

Checkpoint inputs (``path``; each with ``param_key_*`` and ``strict_load_*``, default ``params`` / true):

``pretrain_network_vq``     the frozen VQGAN (required).
``pretrain_network_stage2`` ``RRDB.*`` + ``flowUpsamplerNet.*`` (a Stage-II checkpoint).
``pretrain_network_glare``  ``RRDB.*`` + ``flowUpsamplerNet.*`` + ``deformable_decoder.*`` (a Stage-III checkpoint
                            or the official ``net_G.pth`` with ``param_key_glare: ~``); Stage III only.
``pretrain_network_nat2``   ``nat2.*`` from a NAT-II checkpoint (e.g. ``GLARENATModel``'s ``net_g``; other keys of
                            the file are ignored). Default key ``params_ema`` (falls back to ``params``).
``pretrain_network_g``      the whole ``network_g`` (loaded last, so it wins).

Calibrated values travel in the checkpoints (buffers ``nat2.dist_temp``, ``nat2.tau``, ``nat3.tau3``); a number given
in the options (``network_g.nat2.uncertainty.tau: 0.5``) overrides the loaded value, ``auto`` keeps it (the networks
apply this when they load a state dict). The options' schema and defaults: :mod:`glare_nat_arch.nat_options`; the
validation statistics: :mod:`glare_nat_models.nat_stats`.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from copy import deepcopy
from os import path as osp
from typing import Any

import torch
from basicsr.data import build_dataset
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from basicsr.utils.registry import MODEL_REGISTRY
from torch import Tensor, nn

from glare_nat_arch.glare_nat_arch import GLARE_PREFIXES, NAT_PREFIXES, GLARENATFlowNet, GLARENATNet, vqgan_codebook
from glare_nat_arch.nat_head import masked_ce_loss
from glare_nat_arch.nat_options import NAT2TrainOptions, NAT3TrainOptions, parse_options
from glare_nat_arch.nat_uncertainty import sample_train_mask
from glare_nat_arch.padding import pad_to_multiple
from glare_nat_models.base_model import GLAREBaseModel, image_loss
from glare_nat_models.checkpoint import STAGE2_PREFIXES
from glare_nat_models.glare_aft_model import GLAREAFTModel, init_mf_decoder
from glare_nat_models.glare_flow_model import setup_frozen_vqgan
from glare_nat_models.nat_stats import NATValStats, write_nat_stats

__all__ = [
    "mfm_loss",
    "GLARENATModel",
    "GLARENATAFTModel",
]


def mfm_loss(h_hat: Tensor, h_star: Tensor, pixel_mask: Tensor) -> Tensor:
    """Masked feature modelling ``sum(|h_hat - h*| * m) / (sum(m) * C)`` (docs/nat.md; mean over masked elements).

    Args:
        h_hat, h_star: ``B x C x h x w``; pixel_mask: bool ``B x 1 x h x w``. Returns 0 when nothing is masked.
    """
    m = pixel_mask.to(h_hat.dtype)
    denom = m.sum() * h_hat.shape[1]
    return ((h_hat - h_star).abs() * m).sum() / denom.clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------- shared
class _NATModelMixin:
    """Checkpoint parts, calibration and option checks shared by both NAT models."""

    opt: dict
    net_g: nn.Module
    net_vq: nn.Module
    device: torch.device

    def bare_net(self) -> nn.Module:
        return self.get_bare_model(self.net_g)

    def _check_net(self, cls: type) -> None:
        bare = self.bare_net()
        name = type(self).__name__
        if not isinstance(bare, cls):
            raise ValueError(f"{name}: network_g must be a {cls.__name__}, got {type(bare).__name__}")
        quant = self.net_vq.quantize
        if bare.codebook_size != quant.n_e:
            raise ValueError(
                f"{name}: network_g.codebook_size = {bare.codebook_size} but network_vq.n_embed = {quant.n_e}"
            )
        if bare.nat2 is not None and bare.nat2.code_dim != quant.e_dim:
            raise ValueError(
                f"{name}: network_g.z_channels = {bare.nat2.code_dim} but network_vq.embed_dim = {quant.e_dim}"
            )

    def _load_part(self, key: str, prefixes: tuple[str, ...], default_key: str = "params") -> bool:
        """Load ``path.pretrain_network_<key>`` restricted to ``prefixes`` (other keys of the file are ignored)."""
        path_opt = self.opt["path"]
        load_path = path_opt.get(f"pretrain_network_{key}")
        if load_path is None:
            return False
        drop = tuple(p for p in GLARE_PREFIXES + NAT_PREFIXES if p not in prefixes)
        self.load_network(
            self.net_g,
            load_path,
            path_opt.get(f"strict_load_{key}", True),
            path_opt.get(f"param_key_{key}", default_key),
            prefixes=prefixes,
            drop_prefixes=drop,
        )
        return True

    def needs_calibration(self) -> bool:
        """True while an ``auto`` NAT threshold / temperature is still NaN (uncalibrated)."""
        bare = self.bare_net()
        nat2, nat3 = bare.nat2, getattr(bare, "nat3", None)
        values = [] if nat2 is None else [nat2.dist_temp, nat2.tau]
        if nat3 is not None:
            values.append(nat3.tau3)
        return any(math.isnan(float(v)) for v in values)

    def calibration_images(self, train_cfg: NAT2TrainOptions | NAT3TrainOptions) -> list[Tensor] | None:
        """Low-light images (``1 x 3 x H x W`` each) of ``datasets.<calib_dataset>``, or None if not configured."""
        name = train_cfg.calib_dataset
        ds_opt = (self.opt.get("datasets") or {}).get(name)
        if ds_opt is None:
            return None
        ds_opt = deepcopy(dict(ds_opt))
        ds_opt.setdefault("phase", name.split("_")[0])
        dataset = build_dataset(ds_opt)
        count = min(len(dataset), train_cfg.calib_max_images)
        return [dataset[i]["lq"][None] for i in range(count)]

    @torch.no_grad()
    def calibrate_nats(self, lq_batches: Iterable[Tensor], source: str) -> dict[str, float]:
        """Calibrate every NaN ``dist_temp`` / ``tau`` (NAT-II) and ``tau3`` (NAT-III) on ``lq_batches``.

        ``tau`` and ``tau3`` are the ``1 - nat2.uncertainty.rho_target`` quantiles of the flow entropy and of the
        NAT-III patch uncertainty. Frozen networks only; the NATs run in eval mode. Returns the new values.
        """
        bare = self.bare_net()
        nat2, nat3 = bare.nat2, getattr(bare, "nat3", None)
        need_dt = nat2 is not None and math.isnan(float(nat2.dist_temp))
        need_tau = nat2 is not None and math.isnan(float(nat2.tau))
        need_t3 = nat3 is not None and math.isnan(float(nat3.tau3))
        if not (need_dt or need_tau or need_t3):
            return {}
        codebook = vqgan_codebook(self.net_vq)
        rho = nat2.rho_target  # NAT-III keeps a NAT-II for its uncertainty: nat2 is there when anything is
        modes = {m: m.training for m in (nat2, nat3) if m is not None}
        for m in modes:
            m.eval()
        latents = []
        for lq in lq_batches:
            x, _ = pad_to_multiple(lq.to(self.device), bare.downscale)
            rev = bare.reverse(x)
            latents.append({k: rev[k].float() for k in ("z_hat", "color_map", "cond")})
        values: dict[str, float] = {}
        if need_dt or need_tau:
            values.update(
                nat2.calibrate(
                    [r["z_hat"] for r in latents],
                    codebook,
                    rho,
                    set_dist_temp=need_dt,
                    set_tau=need_tau,
                    scores=None
                    if nat2.uncertainty_source != "flow_mc"
                    else [bare.nat2_score(r, codebook) for r in latents],
                )
            )
        if need_t3:
            values["tau3"] = nat3.calibrate([bare.refine_latent(r, codebook)["uncertainty"] for r in latents], rho)
        for m, mode in modes.items():
            m.train(mode)
        n_pos = sum(r["z_hat"].shape[0] * r["z_hat"].shape[-2] * r["z_hat"].shape[-1] for r in latents)
        shown = ", ".join(f"{k} = {v:.6g}" for k, v in values.items())
        get_root_logger().info(
            f"NAT calibration on {source} ({len(latents)} batches, {n_pos} latent positions, rho_target {rho}): {shown}"
        )
        return values

    def calibrate_before_training(self, train_cfg: NAT2TrainOptions | NAT3TrainOptions) -> None:
        """Calibrate on ``datasets.<calib_dataset>`` now, or leave it to the first training batch (logged)."""
        if not self.needs_calibration():
            return
        images = self.calibration_images(train_cfg)
        if images is None:
            get_root_logger().info(
                f"NAT calibration deferred to the first training batch (no datasets.{train_cfg.calib_dataset})"
            )
            return
        self.calibrate_nats(images, f"datasets.{train_cfg.calib_dataset}")

    def check_full_frames(self, full_frames: bool) -> None:
        """``train.nat2.full_frames`` must agree with ``datasets.train.gt_size`` (full frames = no crop)."""
        ds = (self.opt.get("datasets") or {}).get("train")
        if ds is None:
            return
        if full_frames and ds.get("gt_size") is not None:
            raise ValueError(
                f"train.nat2.full_frames is true but datasets.train.gt_size = {ds['gt_size']} crops the frames; "
                "set gt_size: ~ (full frames) or full_frames: false"
            )
        if not full_frames and ds.get("gt_size") is None:
            raise ValueError("train.nat2.full_frames is false but datasets.train.gt_size is not set (no crop size)")

    @master_only
    def write_nat_stats(self, stats: Mapping[str, Any], current_iter: Any) -> str:
        """``nat_val_stats_<iter>.json`` and ``nat_val_stats_latest.json`` in the experiment (or results) folder."""
        path_opt = self.opt["path"]
        root = path_opt.get("experiments_root") or path_opt.get("results_root") or osp.dirname(path_opt["log"])
        return write_nat_stats(root, stats, current_iter)


# ----------------------------------------------------------------------------------------------------- Stage II
@MODEL_REGISTRY.register()
class GLARENATModel(_NATModelMixin, GLAREBaseModel):
    """Latent NAT (NAT-II) training on a frozen Stage II, and Stage-II inference with NAT-II (module docstring)."""

    def build_aux_networks(self) -> None:
        self.net_vq = setup_frozen_vqgan(self)
        self._check_net(GLARENATFlowNet)
        bare = self.bare_net()
        if not bare.nat2_enabled:
            raise ValueError("GLARENATModel: network_g.nat2 must be given and enabled (nat2.enable: true)")
        has_stage2 = self._load_part("stage2", STAGE2_PREFIXES)
        has_nat2 = self._load_part("nat2", ("nat2.",), default_key="params_ema")
        if self.is_train and not has_nat2 and self.opt["path"].get("pretrain_network_g") is None:
            # fresh NAT-II weights (a resume or pretrained file sets pretrain_network_g and keeps its own); one
            # generator seeded alike on every rank (BasicSR seeds the global RNG with seed + rank, and DDP has
            # already broadcast the initial weights), so all ranks start from the same embedding
            gen = torch.Generator().manual_seed(int(self.opt.get("manual_seed") or 0))
            if bare.nat2.init_token_embedding(vqgan_codebook(self.net_vq), gen):
                get_root_logger().info("NAT-II token embedding initialised from the codebook (tok_init: codebook_lift)")
        if self.is_train and not has_stage2 and self.opt["path"].get("pretrain_network_g") is None:
            raise KeyError(
                "GLARENATModel training needs path.pretrain_network_stage2 (the Stage-II checkpoint) or "
                "path.pretrain_network_g: the conditional encoder and the flow are frozen"
            )
        self.freeze(bare.RRDB, bare.flowUpsamplerNet)
        self._val_stats: NATValStats | None = None

    def init_training_settings(self) -> None:
        self.nat_train = parse_options(NAT2TrainOptions, self.opt["train"].get("nat2"), "train.nat2")
        cfg = self.nat_train
        self.check_full_frames(cfg.full_frames)
        self.calibrate_before_training(cfg)
        self.setup_ema()
        self.set_train_mode()
        self.setup_optimizers()
        self.setup_schedulers()

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def training_tokens(self, rev: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input ids ``V``, loss mask ``M`` and the flow uncertainty ``H`` (the normalised entropy, or the margin
        score with ``uncertainty.source: margin``; all ``B x h x w``) of one batch (docs/nat.md)."""
        cfg, nat2 = self.nat_train, self.bare_net().nat2
        codebook = vqgan_codebook(self.net_vq)
        score = self.bare_net().nat2_score(rev, codebook)  # flow_mc only, else None
        unc = nat2.uncertainty(rev["z_hat"], codebook, score)
        visible = unc.codes
        if cfg.p_gt_visible > 0:
            pick = torch.rand(y.shape[0], device=y.device) < cfg.p_gt_visible
            visible = torch.where(pick[:, None, None], y, visible)
        mask = sample_train_mask(unc.score, cfg.r_min, cfg.r_max, cfg.beta_entropy, None, cfg.r_dist)
        tokens = torch.where(mask, nat2.mask_token_id, visible)
        if nat2.iters > 1 and random.random() < cfg.unroll_p:
            t_star = random.randint(1, nat2.iters - 1)
            was_training = nat2.training
            nat2.eval()
            ref = nat2.refine(rev["z_hat"], codebook, rev["color_map"], rev["cond"], score=score)
            nat2.train(was_training)
            if ref["rounds"] >= t_star and bool(ref["masks"][t_star - 1].any()):
                tokens, mask = ref["tokens"][t_star - 1], ref["masks"][t_star - 1]
        return tokens, mask, unc.score

    def optimize_parameters(self, current_iter: int) -> None:
        self.set_train_mode()
        self.log_dict = OrderedDict()
        if self.needs_calibration():
            self.calibrate_nats([self.lq], f"the first training batch (iteration {current_iter})")
        bare = self.bare_net()
        nat2, cfg = bare.nat2, self.nat_train
        self.optimizer_g.zero_grad(set_to_none=True)
        with torch.no_grad():
            lq, _ = pad_to_multiple(self.lq, bare.downscale)
            gt, _ = pad_to_multiple(self.gt, bare.downscale)
            rev = bare.reverse(lq)
            y = self.net_vq.quantize.nearest_indices(self.net_vq.encode(gt))
            tokens, mask, entropy = self.training_tokens(rev, y)
        lambda_vis = cfg.lambda_vis
        query = mask if lambda_vis == 0 else torch.ones_like(mask)
        with self.autocast():
            logits = nat2.logits(tokens, rev["z_hat"], rev["color_map"], rev["cond"], entropy, query)
        rows = mask[query]  # which query rows are masked positions (logits follow tensor[query] order)
        eps = cfg.label_smoothing
        loss_dict = OrderedDict(l_ce=masked_ce_loss(logits[rows], y[mask], label_smoothing=eps))
        if lambda_vis > 0:
            loss_dict["l_vis"] = lambda_vis * masked_ce_loss(logits[~rows], y[query & ~mask], label_smoothing=eps)
        stepped = self.check_finite(loss_dict, current_iter)
        if stepped:
            self.backward_and_step(sum(loss_dict.values()), self.optimizer_g, "g", current_iter)
        with torch.no_grad():
            loss_dict["mask_frac"] = mask.float().mean()
            loss_dict["acc_masked"] = (logits[rows].argmax(1) == y[mask]).float().mean()
        self.finish_step(loss_dict, stepped)

    # ------------------------------------------------------------------ inference / validation
    def forward_test(self, net: nn.Module, lq: Tensor) -> Tensor:
        """Stage II + NAT-II: ``flow^-1`` -> NAT-II -> VQGAN decoder RGB, clamped to [0, 1]."""
        out = self.get_bare_model(net).enhance(lq, self.net_vq, return_intermediates=True)
        self._last_refine = out["refine"]
        return out["output"].clamp(0, 1)

    def test(self) -> None:
        """Stock test; during validation also accumulates NAT token statistics against the teacher codes."""
        self._last_refine = None
        super().test()
        if self._val_stats is None or not hasattr(self, "gt") or self._last_refine is None:
            return
        ref = self._last_refine
        bare = self.get_bare_model(self.inference_net())
        f = bare.downscale
        with torch.no_grad():
            gt, (top, h, left, w) = self.pad_for_test(self.gt)
            gt, _ = pad_to_multiple(gt, f)
            y = self.net_vq.quantize.nearest_indices(self.net_vq.encode(gt))
        rows = slice(top // f, -(-(top + h) // f))
        cols = slice(left // f, -(-(left + w) // f))
        maps = [ref["codes_init"], ref["codes"], y, ref["mask_init"], ref["entropy"], ref["score"]]
        self._val_stats.update(*(m[:, rows, cols] for m in maps))
        self.oracle_psnr(ref, y, (top, h, left, w))

    @torch.no_grad()
    def oracle_psnr(self, ref: Mapping[str, Any], y: Tensor, crop: tuple[int, int, int, int]) -> None:
        """PSNR of the NAT output and of images decoded from (a) the flow's codes v0 (= Stage II without NAT),
        (b) v0 with the teacher codes at the initially masked positions (the most NAT-II can reach) and (c)
        the teacher codes everywhere (the VQGAN's own ceiling); NAT gains read against (b) - (a)
        (docs/nat.md "Validation statistics")."""
        top, h, left, w = crop
        stats = self._val_stats
        stats.add_psnr("nat", self.output, self.gt)
        v0, m0 = ref["codes_init"], ref["mask_init"]
        oracles = {"oracle_flow_codes": v0, "oracle_gt_at_mask0": torch.where(m0, y, v0), "oracle_all_gt": y}
        for name, codes in oracles.items():
            rgb, _ = self.net_vq.decode_indices(codes)
            stats.add_psnr(name, rgb[..., top : top + h, left : left + w].float(), self.gt)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """Stock image metrics of the Stage-II + NAT-II output, then the NAT token statistics (logged + JSON)."""
        self._val_stats = NATValStats()
        try:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
            stats = self._val_stats
        finally:
            self._val_stats = None
        if not stats.n_images:
            return
        summary = stats.summary()
        nat2 = self.get_bare_model(self.inference_net()).nat2
        summary.update(tau=float(nat2.tau), dist_temp=float(nat2.dist_temp))
        shown = ", ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in summary.items())
        get_root_logger().info(f"NAT validation [{dataloader.dataset.opt['name']}] iter {current_iter}: {shown}")
        if tb_logger is not None:
            for k, v in summary.items():
                if isinstance(v, float):
                    tb_logger.add_scalar(f"nat/{k}", v, current_iter)
        self.write_nat_stats(summary, current_iter)


# ----------------------------------------------------------------------------------------------------- Stage III
@MODEL_REGISTRY.register()
class GLARENATAFTModel(_NATModelMixin, GLAREAFTModel):
    """Stage III with NAT-II feeding the decoders and NAT-III on ``D_MF``'s bottleneck (module docstring).

    Trained: ``deformable_decoder`` (``train.optim_g``) and ``nat3`` (same optimizer, own group with
    ``train.nat3.lr`` and a linear warm-up of ``train.nat3.warmup`` iterations). Frozen: VQGAN, ``RRDB``,
    ``flowUpsamplerNet``, ``nat2``. Loss: the Stage-III image losses of :class:`GLAREAFTModel` plus
    ``lambda_mfm * L_mfm`` when NAT-III is on.
    """

    def build_aux_networks(self) -> None:
        self.net_vq = setup_frozen_vqgan(self)
        self._check_net(GLARENATNet)
        bare = self.bare_net()
        loaded = [self._load_part("stage2", STAGE2_PREFIXES), self._load_part("glare", GLARE_PREFIXES)]
        self._load_part("nat2", ("nat2.",), default_key="params_ema")
        if self.is_train and not any(loaded) and self.opt["path"].get("pretrain_network_g") is None:
            raise KeyError(
                "GLARENATAFTModel training needs path.pretrain_network_stage2 or pretrain_network_glare (or "
                "pretrain_network_g): the conditional encoder and the flow are frozen"
            )
        frozen = [bare.RRDB, bare.flowUpsamplerNet] + ([bare.nat2] if bare.nat2 is not None else [])
        self.freeze(*frozen)
        if self.is_train and not loaded[1]:  # D_MF not from a Stage-III file: train.mf_init decides
            init_mf_decoder(bare.deformable_decoder, self.net_vq, self.opt["train"].get("mf_init", "random"))

    def init_training_settings(self) -> None:
        self.nat3_train = parse_options(NAT3TrainOptions, self.opt["train"].get("nat3"), "train.nat3")
        self.nat3_warmup = self.nat3_train.warmup
        self.calibrate_before_training(self.nat3_train)
        super().init_training_settings()

    def setup_optimizers(self) -> None:
        """``optim_g`` with two groups: ``D_MF`` (``optim_g.lr``) and ``nat3`` (``train.nat3.lr``)."""
        params = self.trainable_parameters(self.net_g, "net_g")
        nat3 = self.bare_net().nat3
        nat3_ids = {id(p) for p in nat3.parameters()} if nat3 is not None else set()
        groups: list[dict[str, Any]] = []
        rest = [p for p in params if id(p) not in nat3_ids]
        if rest:
            groups.append({"params": rest, "name": "decoder"})
        mine = [p for p in params if id(p) in nat3_ids]
        if mine:
            groups.append({"params": mine, "lr": self.nat3_train.lr, "name": "nat3"})
        self.optimizer_g = self.build_optimizer(self.opt["train"]["optim_g"], groups, "optim_g")
        self.optimizers.append(self.optimizer_g)
        self.check_frozen_not_optimized()

    def update_learning_rate(self, current_iter: int, warmup_iter: int = -1) -> None:
        """Stock schedule / warm-up, then NAT-III's own linear warm-up over ``train.nat3.warmup`` iterations."""
        super().update_learning_rate(current_iter, warmup_iter)
        if 0 < self.nat3_warmup and current_iter <= self.nat3_warmup:
            for group in self.optimizer_g.param_groups:
                if group.get("name") == "nat3":
                    group["lr"] = group["initial_lr"] * current_iter / self.nat3_warmup

    def mfm_teacher(self, gt: Tensor) -> Tensor:
        """``h*``: ``conv_in + mid`` of the EMA ``D_MF`` (``net_g`` itself, detached, without EMA) on ``E_vq(gt)``."""
        teacher = self.get_bare_model(getattr(self, "net_g_ema", self.net_g)).deformable_decoder
        with torch.no_grad():
            gt, _ = pad_to_multiple(gt, self.bare_net().downscale)
            return teacher.mid(teacher.conv_in(self.net_vq.encode(gt)))

    def optimize_parameters(self, current_iter: int) -> None:
        self.set_train_mode()
        self.log_dict = OrderedDict()
        if self.needs_calibration():
            self.calibrate_nats([self.lq], f"the first training batch (iteration {current_iter})")
        nat3 = self.bare_net().nat3
        lambda_mfm = self.nat3_train.lambda_mfm if nat3 is not None else 0.0
        r_max = self.nat3_train.train_random_r_max if nat3 is not None else 0.0
        self.optimizer_g.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.net_g(self.lq, self.net_vq, return_intermediates=nat3 is not None, nat3_random_r_max=r_max)
            h_star = self.mfm_teacher(self.gt) if lambda_mfm > 0 else None
        output = out["output"] if isinstance(out, dict) else out
        self.output = output.float().clamp(0, 1)
        loss_dict = OrderedDict()
        for key, cri in (("l_pix", self.cri_pix), ("l_percep", self.cri_perceptual), ("l_msssim", self.cri_msssim)):
            if cri is not None:
                loss_dict[key] = image_loss(cri, self.output, self.gt)
        if h_star is not None:
            h_hat = out["nat3_h"]
            pix = nat3.expand_mask(out["nat3_mask"], h_hat.shape[-2], h_hat.shape[-1])
            loss_dict["l_mfm"] = lambda_mfm * mfm_loss(h_hat.float(), h_star.float(), pix)
        stepped = self.check_finite(loss_dict, current_iter)
        if stepped:
            self.backward_and_step(sum(loss_dict.values()), self.optimizer_g, "g", current_iter)
        if nat3 is not None:
            loss_dict["nat3_mask_frac"] = out["nat3_mask"].float().mean()
        self.finish_step(loss_dict, stepped)
