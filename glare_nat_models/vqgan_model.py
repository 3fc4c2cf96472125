"""Stage I of GLARE: train the normal-light VQGAN (``network_g: GLAREVQGAN``) on normal-light images.

The official repository ships no Stage-I training code (docs/glare.md): its ``VQModel.training_step`` calls
taming-transformers' ``VQLPIPSWithDiscriminator`` interface, and its optimizers are Adam with betas (0.5, 0.9).
This model implements that recipe (taming ``taming/modules/losses/vqperceptual.py``) in BasicSR form::

    nll     = L1(rec, x) + LPIPS(rec, x)                                   (pixel_opt, perceptual_opt)
    g_loss  = -mean(D(rec))                                                (gan_opt, HingeGANLoss)
    lambda  = clamp(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, d_weight_max)   W = decoder.conv_out.weight
    L_G     = nll + codebook_weight * emb_loss + ramp(iter) * lambda * disc_weight * g_loss   (ramp 0 until disc_start)
    L_D     = [iter > disc_start] * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(sg(rec)))))

``disc_weight`` is ``gan_opt.loss_weight`` (taming configs: 0.8); ``emb_loss`` is the quantiser's codebook +
0.25 commitment loss. The input and the target are the dataset's ``gt`` (normal-light) images, in [0, 1]; the
discriminator sees them mapped to [-1, 1], as taming's. Differences from taming, on purpose: the reconstruction
losses see [0, 1] images (taming's L1 on [-1, 1] is twice ours: the YAMLs set ``pixel_opt.loss_weight: 2.0``;
LPIPS maps to [-1, 1] itself); the discriminator step reuses the generator's reconstruction of the same batch
(BasicSR SRGAN style) instead of a second forward pass; before ``disc_start`` the discriminator is not stepped at
all (taming multiplies its loss by 0, which leaves Adam's state untouched too).

Options (``train``): ``pixel_opt``, ``perceptual_opt`` (at least one; ``LPIPSLoss`` with ``net: auto`` uses
taming's VGG16 trunk when its weights are local), ``gan_opt`` (required, ``HingeGANLoss``), ``codebook_weight``
(1.0), ``disc_start`` (iteration after which the GAN terms are on), ``disc_warmup`` (0: after ``disc_start`` the
generator's GAN term ramps linearly from 0 to its full weight over this many iterations), ``d_weight_max`` (1e4,
taming's cap of the adaptive weight ``lambda``), ``codebook_init`` (``uniform``: taming's U(-1/K, 1/K), every code
near the origin; ``encoder``: at the first step of a fresh run every code becomes a random encoder latent of the
batch), ``code_restart_every`` (0 = off, the taming recipe; N > 0: every N iterations, codes unused during those N
iterations are reset to random encoder latents of the current batch, a common remedy for codebook collapse that
is *not* part of taming), ``optim_g``, ``optim_d``, plus everything of
:class:`~glare_nat_models.base_model.GLAREBaseModel`. Validation logs the codebook usage on the validation images
(codes used, perplexity). ``network_d``: the discriminator; ``path.pretrain_network_d`` / ``param_key_d`` /
``strict_load_d`` as for ``net_g``.
"""

from __future__ import annotations

from collections import OrderedDict
from copy import deepcopy

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from glare_nat_models.base_model import GLAREBaseModel, image_loss
from glare_nat_models.losses import adaptive_gan_weight

__all__ = ["VQGANModel", "codebook_usage", "to_disc_range"]


def codebook_usage(counts: torch.Tensor) -> tuple[int, float]:
    """``(codes used, perplexity)`` of a code histogram ``counts`` (K,): perplexity ``exp(-sum p log p)``."""
    total = int(counts.sum())
    if total == 0:
        return 0, 0.0
    p = counts.double() / total
    p = p[p > 0]
    return int((counts > 0).sum()), float(torch.exp(-(p * p.log()).sum()))


def to_disc_range(img: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> [-1, 1], the value range taming's discriminator sees."""
    return img * 2 - 1


@MODEL_REGISTRY.register()
class VQGANModel(GLAREBaseModel):
    """Stage-I VQGAN training: reconstruction + LPIPS + codebook + adaptive hinge PatchGAN (see module doc).

    ``feed_data`` uses ``gt`` (or ``lq`` when a batch has no ``gt``) as both input and target; ``test()``
    reconstructs it, so validation metrics measure reconstruction quality.
    """

    def feed_data(self, data: dict) -> None:
        img = data["gt"] if "gt" in data else data["lq"]
        self.gt = img.to(self.device)
        self.lq = self.gt  # the VQGAN's input is the normal-light image itself

    def init_training_settings(self) -> None:
        train_opt = self.opt["train"]
        self.setup_ema()
        if "network_d" not in self.opt:
            raise KeyError("VQGANModel needs a 'network_d' section (e.g. type: PatchGANDiscriminator)")
        self.net_d = self.model_to_device(build_network(deepcopy(self.opt["network_d"])))
        self.print_network(self.net_d)
        path_opt = self.opt["path"]
        if path_opt.get("pretrain_network_d") is not None:
            self.load_network(
                self.net_d,
                path_opt["pretrain_network_d"],
                path_opt.get("strict_load_d", True),
                path_opt.get("param_key_d", "params"),
            )
        self.cri_pix = self.build_optional_loss("pixel_opt")
        self.cri_perceptual = self.build_optional_loss("perceptual_opt")
        if self.cri_pix is None and self.cri_perceptual is None:
            raise ValueError("train: VQGANModel needs pixel_opt and/or perceptual_opt")
        if not train_opt.get("gan_opt"):
            raise KeyError("train.gan_opt is required for VQGANModel (e.g. {type: HingeGANLoss, loss_weight: 0.8})")
        self.cri_gan = build_loss(deepcopy(train_opt["gan_opt"])).to(self.device)
        self.disc_weight = float(getattr(self.cri_gan, "loss_weight", 1.0))
        if self.disc_weight <= 0:
            raise ValueError("train.gan_opt.loss_weight (the taming disc_weight) must be > 0")
        self.codebook_weight = float(train_opt.get("codebook_weight", 1.0))
        self.disc_start = int(train_opt.get("disc_start", 0))
        self.disc_warmup = int(train_opt.get("disc_warmup", 0) or 0)
        self.d_weight_max = float(train_opt.get("d_weight_max", 1e4))
        self.code_restart_every = int(train_opt.get("code_restart_every", 0) or 0)
        self.codebook_init = str(train_opt.get("codebook_init", "uniform"))
        if self.codebook_init not in ("uniform", "encoder"):
            raise ValueError(f"train.codebook_init is {self.codebook_init!r}; expected 'uniform' or 'encoder'")
        fresh = self.opt["path"].get("pretrain_network_g") is None and not self.opt["path"].get("resume_state")
        self._init_codes_from_encoder = self.codebook_init == "encoder" and fresh
        n_e = self.get_bare_model(self.net_g).quantize.n_e
        self.code_counts = torch.zeros(n_e, dtype=torch.long, device=self.device)
        self.set_train_mode()
        self.setup_optimizers()
        self.setup_schedulers()

    def set_train_mode(self) -> None:
        super().set_train_mode()
        if hasattr(self, "net_d"):
            self.net_d.train()

    def setup_optimizers(self) -> None:
        super().setup_optimizers()
        params_d = self.trainable_parameters(self.net_d, "net_d")
        self.optimizer_d = self.build_optimizer(self.opt["train"]["optim_d"], params_d, "optim_d")
        self.optimizers.append(self.optimizer_d)
        self.check_frozen_not_optimized()

    def optimize_parameters(self, current_iter: int) -> None:
        self.set_train_mode()
        self.log_dict = OrderedDict()
        gan_on = current_iter > self.disc_start
        net_g = self.get_bare_model(self.net_g)

        initialised = None
        if self._init_codes_from_encoder:  # first step of a fresh run: every code becomes an encoder latent
            self._init_codes_from_encoder = False
            self.code_counts.zero_()
            initialised = float(self.restart_dead_codes())

        # ---- generator
        self.net_d.requires_grad_(False)
        self.optimizer_g.zero_grad(set_to_none=True)
        with self.autocast():
            rec, emb_loss, indices = self.net_g(self.gt)
        rec = rec.float()
        self.output = rec
        loss_dict = OrderedDict()
        if initialised is not None:
            loss_dict["codes_restarted"] = torch.tensor(initialised, device=self.device)
        nll = 0
        if self.cri_pix is not None:
            loss_dict["l_g_pix"] = image_loss(self.cri_pix, rec, self.gt)
            nll = nll + loss_dict["l_g_pix"]
        if self.cri_perceptual is not None:
            loss_dict["l_g_percep"] = image_loss(self.cri_perceptual, rec, self.gt)
            nll = nll + loss_dict["l_g_percep"]
        loss_dict["l_g_codebook"] = self.codebook_weight * emb_loss.float().mean()
        if gan_on:
            with self.autocast():
                logits_fake = self.net_d(to_disc_range(rec))
            g_raw = self.cri_gan(logits_fake.float(), True, is_disc=False) / self.disc_weight
            d_weight = adaptive_gan_weight(nll, g_raw, net_g.get_last_layer(), max_weight=self.d_weight_max)
            ramp = self.gan_ramp(current_iter)
            loss_dict["l_g_gan"] = ramp * d_weight * self.disc_weight * g_raw
            loss_dict["d_weight"] = d_weight
            loss_dict["gan_ramp"] = torch.tensor(ramp, device=self.device)
        stepped = self.check_finite(loss_dict, current_iter)
        if stepped:
            total = sum(v for k, v in loss_dict.items() if k.startswith("l_g_"))
            self.backward_and_step(total, self.optimizer_g, "g", current_iter)
        loss_dict["code_usage"] = torch.tensor(indices.unique().numel() / net_g.quantize.n_e, device=self.device)
        self.code_counts += torch.bincount(indices.flatten(), minlength=self.code_counts.numel())
        if stepped and self.code_restart_every and current_iter % self.code_restart_every == 0:
            loss_dict["codes_restarted"] = torch.tensor(float(self.restart_dead_codes()), device=self.device)

        # ---- discriminator (after disc_start, and only when the generator step was finite)
        self.net_d.requires_grad_(True)
        if gan_on and stepped:
            self.optimizer_d.zero_grad(set_to_none=True)
            with self.autocast():
                logits_real = self.net_d(to_disc_range(self.gt))
                logits_fake = self.net_d(to_disc_range(rec.detach()))
            d_terms = OrderedDict(
                l_d_real=self.cri_gan(logits_real.float(), True, is_disc=True),
                l_d_fake=self.cri_gan(logits_fake.float(), False, is_disc=True),
            )
            if self.check_finite(d_terms, current_iter):
                self.backward_and_step(d_terms["l_d_real"] + d_terms["l_d_fake"], self.optimizer_d, "d", current_iter)
            loss_dict.update(d_terms)
            loss_dict["out_d_real"] = logits_real.detach().float().mean()
            loss_dict["out_d_fake"] = logits_fake.detach().float().mean()
        self.finish_step(loss_dict, stepped)

    def gan_ramp(self, current_iter: int) -> float:
        """Weight of the generator's GAN term: 0 before ``disc_start``, then a linear ramp to 1 over ``disc_warmup``
        iterations (1 at once without a warm-up), so the adaptive weight never switches a full GAN on at once."""
        if current_iter <= self.disc_start:
            return 0.0
        if self.disc_warmup <= 0:
            return 1.0
        return min(1.0, (current_iter - self.disc_start) / self.disc_warmup)

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Reset codes unused since the last restart to random encoder latents of the current batch.

        Returns the number of codes reset. Their Adam moments are zeroed so the new values are not pulled back.
        """
        net_g = self.get_bare_model(self.net_g)
        dead = torch.nonzero(self.code_counts == 0).flatten()
        self.code_counts.zero_()
        if dead.numel() == 0:
            return 0
        with self.autocast():
            latent = net_g.encode(self.gt).float()
        flat = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
        pick = flat[torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)]
        weight = net_g.quantize.embedding.weight
        weight[dead] = pick.to(weight.dtype)
        state = self.optimizer_g.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead] = 0
        return int(dead.numel())

    def forward_test(self, net, lq: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 3, H, W) of ``lq`` (the normal-light image), clamped to [0, 1]; during validation the
        codes it used are counted for :meth:`nondist_validation`."""
        rec, _, indices = net(lq)
        if getattr(self, "_val_code_counts", None) is not None:
            self._val_code_counts += torch.bincount(indices.flatten(), minlength=self._val_code_counts.numel())
        return rec.clamp(0, 1)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """Stock image metrics of the reconstruction, then the codebook usage on the validation images: codes used
        and perplexity ``exp(-sum p log p)`` of the code histogram (K for a uniform use of all K codes, 1 for a
        collapse onto one code)."""
        n_e = self.get_bare_model(self.net_g).quantize.n_e
        self._val_code_counts = torch.zeros(n_e, dtype=torch.long, device=self.device)
        try:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
            counts = self._val_code_counts
        finally:
            self._val_code_counts = None
        self.val_code_usage = codebook_usage(counts)
        used, perplexity = self.val_code_usage
        name = dataloader.dataset.opt["name"]
        get_root_logger().info(
            f"Codebook usage [{name}] iter {current_iter}: {used}/{n_e} codes used, perplexity {perplexity:.2f}"
        )
        if tb_logger is not None:
            tb_logger.add_scalar(f"codebook/{name}/used", used, current_iter)
            tb_logger.add_scalar(f"codebook/{name}/perplexity", perplexity, current_iter)

    def save(self, epoch: int, current_iter: int) -> None:
        if hasattr(self, "net_g_ema"):
            self.save_network([self.net_g, self.net_g_ema], "net_g", current_iter, param_key=["params", "params_ema"])
        else:
            self.save_network(self.net_g, "net_g", current_iter)
        self.save_network(self.net_d, "net_d", current_iter)
        self.save_training_state(epoch, current_iter)
