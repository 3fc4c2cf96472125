"""Shared machinery of the glare-nat models (a stock BasicSR ``SRModel`` with reliability features).

Options read here (all optional unless stated):

``train.amp``            ``bf16`` | ``fp16`` | ``~``. fp16 autocast + GradScaler run only on CUDA (on the CPU fp16 falls
                         back to float32 with a warning); bf16 autocast runs on CUDA and CPU, without a scaler.
``val.amp``              autocast dtype for ``test()`` / validation; defaults to ``train.amp`` (``~`` in test mode).
``train.grad_clip``      max global L2 norm of each optimizer's gradients (``~`` / 0: off).
``train.nonfinite``      ``raise`` (default): a NaN/Inf loss term raises ``RuntimeError`` naming the iteration and the
                         term; ``skip``: the step is skipped (no backward, no optimizer step, no EMA) and logged.
``train.ema_decay``      EMA of ``net_g`` as in stock BasicSR (``params_ema`` in checkpoints); buffers are copied too.
``val.use_ema``          ``test()`` uses ``net_g_ema`` when it exists (default true, stock behaviour).
``val.pad_multiple``     reflect-pad test inputs to a multiple of this (and of the net's ``downscale``); cropped back.
``val.extra_pad``        ``[bottom, left]`` extra reflect padding at test time, cropped back (official GLARE: [20, 20]).
``path.strict_load_*``   default true: any missing / unexpected / shape-mismatched key raises with a readable report.
``path.param_key_*``     sub-dict of the checkpoint (default ``params``; ``~`` = bare state dict).

Checkpoints keep BasicSR names and layout (``net_g_<iter>.pth`` = ``{'params': ..., 'params_ema': ...}``,
``<iter>.state``) and are written atomically (``*.tmp`` + ``os.replace``), by the methods of
:class:`~glare_nat_models.model_checkpoints.CheckpointMethods` (shared with stock models run by the launchers).
Frozen sub-networks are really frozen: ``requires_grad=False``, eval mode kept across ``train()`` calls, never
handed to an optimizer (checked).
"""

from __future__ import annotations

import contextlib
import math
import os
import types
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from copy import deepcopy
from os import path as osp
from typing import Any

import numpy as np
import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from torch import nn
from tqdm import tqdm

from glare_nat_arch.padding import pad_to_multiple
from glare_nat_models.model_checkpoints import CheckpointMethods

__all__ = ["GLAREBaseModel", "keep_in_eval", "freeze_module", "image_loss"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def freeze_module(module: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter and eval mode. Returns ``module``."""
    module.requires_grad_(False)
    module.eval()
    return module


def keep_in_eval(net: nn.Module, frozen: Iterable[nn.Module]) -> None:
    """Make ``net.train(mode)`` leave every module of ``frozen`` in eval mode (instance-level override).

    ``frozen`` may contain ``net`` itself (then ``net`` always stays in eval mode). Works through DataParallel
    wrappers too, since ``nn.Module.train`` recurses through ``child.train``.
    """
    frozen = list(frozen)
    cls_train = type(net).train

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        cls_train(self, mode)
        for m in frozen:
            nn.Module.train(m, False)
        return self

    net.train = types.MethodType(train, net)  # type: ignore[method-assign]
    net.train(net.training)


def image_loss(cri: nn.Module, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``cri(pred, target)`` as one scalar; BasicSR's ``PerceptualLoss`` tuple ``(percep, style)`` is summed."""
    out = cri(pred, target)
    if isinstance(out, tuple):
        parts = [o for o in out if o is not None]
        if not parts:
            raise ValueError(f"{type(cri).__name__} returned no loss (both perceptual and style weights are 0)")
        return sum(parts)
    return out


def _amp_dtype(value: Any, key: str) -> torch.dtype | None:
    if value is None or value is False:
        return None
    if value not in _AMP_DTYPES:
        raise ValueError(f"option {key}: expected one of bf16, fp16 or ~ (null), got {value!r}")
    return _AMP_DTYPES[value]


def set_deterministic(enabled: bool) -> None:
    """Top-level option ``deterministic: true``: deterministic algorithms on GPU (cuDNN, cuBLAS, torch ops).

    Ops without a deterministic CUDA kernel warn instead of failing (``warn_only``). On CPU, training with a fixed
    ``manual_seed`` and ``num_worker_per_gpu: 0`` is already bit-for-bit repeatable (tests/test_models.py).
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    get_root_logger().info("deterministic: true -> torch.use_deterministic_algorithms(True), cudnn.deterministic")


@MODEL_REGISTRY.register()
class GLAREBaseModel(CheckpointMethods, SRModel):
    """``SRModel`` plus AMP, gradient clipping, non-finite guard, atomic saves, strict loads and real freezing.

    Used as is, it trains ``network_g`` on ``lq -> gt`` with the stock ``pixel_opt`` / ``perceptual_opt`` losses
    (handy for baselines). The GLARE stage models subclass it and override :meth:`build_aux_networks`,
    :meth:`init_training_settings`, :meth:`optimize_parameters` and :meth:`forward_test`.
    """

    def __init__(self, opt: dict) -> None:
        BaseModel.__init__(self, opt)
        set_deterministic(bool(opt.get("deterministic", False)))
        train_opt = opt.get("train") or {}
        val_opt = opt.get("val") or {}
        self.amp_dtype = self._resolve_amp(_amp_dtype(train_opt.get("amp"), "train.amp") if self.is_train else None)
        val_amp = val_opt["amp"] if "amp" in val_opt else (train_opt.get("amp") if self.is_train else None)
        self.val_amp_dtype = self._resolve_amp(_amp_dtype(val_amp, "val.amp"))
        self.grad_clip = float(train_opt.get("grad_clip") or 0.0)
        self.nonfinite_mode = train_opt.get("nonfinite", "raise")
        if self.nonfinite_mode not in ("raise", "skip"):
            raise ValueError(f"option train.nonfinite: expected 'raise' or 'skip', got {self.nonfinite_mode!r}")
        self.skipped_steps = 0
        self.frozen_modules: list[nn.Module] = []
        self._scalers: dict[str, torch.amp.GradScaler] = {}
        self.log_dict: OrderedDict = OrderedDict()

        self.net_g = build_network(deepcopy(opt["network_g"]))
        self.net_g = self.model_to_device(self.net_g)
        self.print_network(self.net_g)
        self.build_aux_networks()
        self.load_pretrained_g()
        if self.is_train:
            self.init_training_settings()

    # ------------------------------------------------------------------ set-up hooks
    def build_aux_networks(self) -> None:
        """Hook: build / load / freeze extra networks (e.g. the frozen VQGAN). Runs before loading ``net_g``."""

    def load_pretrained_g(self) -> None:
        """Load ``path.pretrain_network_g`` (``param_key_g``, ``strict_load_g``) into ``net_g`` if given."""
        path_opt = self.opt["path"]
        load_path = path_opt.get("pretrain_network_g")
        if load_path is not None:
            self.load_network(
                self.net_g, load_path, path_opt.get("strict_load_g", True), path_opt.get("param_key_g", "params")
            )

    def _resolve_amp(self, dtype: torch.dtype | None) -> torch.dtype | None:
        if dtype is torch.float16 and self.device.type != "cuda":
            get_root_logger().warning("fp16 autocast needs CUDA; running in float32 on the CPU (use bf16 on CPU).")
            return None
        return dtype

    def init_training_settings(self) -> None:
        """Stock SRModel behaviour (EMA, pixel / perceptual losses, optimizer, scheduler) with our helpers."""
        self.setup_ema()
        self.cri_pix = self.build_optional_loss("pixel_opt")
        self.cri_perceptual = self.build_optional_loss("perceptual_opt")
        if self.cri_pix is None and self.cri_perceptual is None:
            raise ValueError("train: both pixel_opt and perceptual_opt are missing; nothing to optimise")
        self.set_train_mode()
        self.setup_optimizers()
        self.setup_schedulers()

    def build_optional_loss(self, key: str) -> nn.Module | None:
        """``build_loss(train.<key>)`` on this device, or None when the option is absent / null."""
        loss_opt = self.opt["train"].get(key)
        return build_loss(deepcopy(loss_opt)).to(self.device) if loss_opt else None

    def setup_ema(self) -> None:
        """Create ``net_g_ema`` when ``train.ema_decay > 0`` (frozen, eval mode), initialised from ``net_g``.

        With ``path.pretrain_network_g`` the EMA weights come from that file (``params_ema``, falling back to
        ``params``; a bare file when ``param_key_g`` is ``~``), as in stock BasicSR.
        """
        self.ema_decay = float(self.opt["train"].get("ema_decay", 0) or 0)
        if self.ema_decay <= 0:
            return
        get_root_logger().info(f"Use Exponential Moving Average with decay: {self.ema_decay}")
        self.net_g_ema = build_network(deepcopy(self.opt["network_g"])).to(self.device)
        self.model_ema(0)  # copy everything (incl. parts loaded outside pretrain_network_g, e.g. Stage-II weights)
        load_path = self.opt["path"].get("pretrain_network_g")
        if load_path is not None:
            key = "params_ema" if self.opt["path"].get("param_key_g", "params") is not None else None
            self.load_network(self.net_g_ema, load_path, self.opt["path"].get("strict_load_g", True), key)
        freeze_module(self.net_g_ema)
        keep_in_eval(self.net_g_ema, [self.net_g_ema])

    def setup_optimizers(self) -> None:
        """``optim_g`` over the trainable parameters of ``net_g`` only (frozen ones are summarised in the log)."""
        params = self.trainable_parameters(self.net_g, "net_g")
        self.optimizer_g = self.build_optimizer(self.opt["train"]["optim_g"], params, "optim_g")
        self.optimizers.append(self.optimizer_g)
        self.check_frozen_not_optimized()

    def trainable_parameters(self, net: nn.Module, label: str) -> list[nn.Parameter]:
        """Parameters of ``net`` with ``requires_grad``; logs a one-line summary of the frozen ones."""
        params, frozen = [], []
        for name, p in self.get_bare_model(net).named_parameters():
            (params if p.requires_grad else frozen).append((name, p))
        if frozen:
            prefixes = sorted({n.split(".")[0] for n, _ in frozen})
            n_frozen = sum(p.numel() for _, p in frozen)
            get_root_logger().info(
                f"{label}: {len(frozen)} frozen tensors ({n_frozen:,d} params; {', '.join(prefixes)}) not optimized."
            )
        if not params:
            raise ValueError(f"{label} has no trainable parameters")
        return [p for _, p in params]

    def build_optimizer(self, optim_opt: Mapping, params: list[nn.Parameter], key: str) -> torch.optim.Optimizer:
        """Build an optimizer from ``{type: Adam|AdamW, lr: ..., ...}`` without mutating the option dict."""
        optim_opt = dict(optim_opt)
        if "type" not in optim_opt:
            raise KeyError(f"option train.{key}.type is required (Adam or AdamW)")
        optim_type = optim_opt.pop("type")
        return self.get_optimizer(optim_type, params, **optim_opt)

    def get_optimizer(self, optim_type: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
        if optim_type == "Adam":
            return torch.optim.Adam(params, lr, **kwargs)
        if optim_type == "AdamW":
            return torch.optim.AdamW(params, lr, **kwargs)
        raise NotImplementedError(f"optimizer {optim_type} is not supported (Adam, AdamW)")

    def setup_schedulers(self) -> None:
        """Stock schedulers, built from a copy of ``train.scheduler`` (the option dict is not mutated)."""
        saved = self.opt["train"]["scheduler"]
        self.opt["train"]["scheduler"] = dict(saved)
        try:
            super().setup_schedulers()
        finally:
            self.opt["train"]["scheduler"] = saved

    # ------------------------------------------------------------------ freezing
    def freeze(self, *modules: nn.Module) -> None:
        """Freeze sub-modules of ``net_g``: no gradients, not optimized, kept in eval mode by ``net_g.train()``."""
        for m in modules:
            freeze_module(m)
            self.frozen_modules.append(m)
        keep_in_eval(self.get_bare_model(self.net_g), [m for m in self.frozen_modules if self._in_net_g(m)])

    def _in_net_g(self, module: nn.Module) -> bool:
        bare = self.get_bare_model(self.net_g)
        return any(module is m for m in bare.modules())

    def freeze_network(self, net: nn.Module) -> nn.Module:
        """Freeze a whole auxiliary network: no gradients, always in eval mode. Returns ``net``."""
        freeze_module(net)
        keep_in_eval(self.get_bare_model(net), [self.get_bare_model(net)])
        self.frozen_modules.append(self.get_bare_model(net))
        return net

    def check_frozen_not_optimized(self) -> None:
        """Raise if a parameter of a frozen module (or any parameter without ``requires_grad``) is in an optimizer."""
        frozen_ids = {id(p) for m in self.frozen_modules for p in m.parameters()}
        for i, opt in enumerate(self.optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in frozen_ids or not p.requires_grad:
                        raise RuntimeError(f"optimizer #{i} holds a frozen parameter of shape {tuple(p.shape)}")

    def set_train_mode(self) -> None:
        """``net_g.train()`` (frozen parts stay in eval mode through :func:`keep_in_eval`)."""
        self.net_g.train()

    # ------------------------------------------------------------------ AMP / steps / guard
    def autocast(self, dtype: torch.dtype | None = None, enabled: bool = True):
        """Autocast context for ``dtype`` (default ``train.amp``) on this model's device; no-op when off."""
        dtype = self.amp_dtype if dtype is None else dtype
        if dtype is None or not enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _scaler(self, name: str) -> torch.amp.GradScaler | None:
        if self.amp_dtype is not torch.float16:
            return None
        if name not in self._scalers:
            self._scalers[name] = torch.amp.GradScaler("cuda")
        return self._scalers[name]

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, name: str, it: int) -> None:
        """Backward ``loss`` and step ``optimizer`` (GradScaler for fp16, ``train.grad_clip``, non-finite check).

        With gradient clipping and no scaler, a non-finite gradient norm is handled like a non-finite loss
        (``train.nonfinite``). ``name`` labels the optimizer (``g``, ``d``) in logs and the GradScaler table.
        """
        scaler = self._scaler(name)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.grad_clip > 0:
            if scaler is not None:
                scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            self.log_dict[f"grad_norm_{name}"] = float(norm)
            if scaler is None and not math.isfinite(float(norm)):
                if not self.check_finite({f"grad_norm_{name}": norm}, it):
                    optimizer.zero_grad(set_to_none=True)
                    return
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def check_finite(self, losses: Mapping[str, Any], current_iter: int) -> bool:
        """True when every tensor in ``losses`` is finite.

        Otherwise ``train.nonfinite: raise`` raises ``RuntimeError`` naming the iteration and the term(s);
        ``skip`` logs a warning, counts the skipped step and returns False (the caller must not step).
        """
        bad = []
        for k, v in losses.items():
            if torch.is_tensor(v) and not bool(torch.isfinite(v.detach()).all()):
                bad.append(f"{k}={v.detach().float().mean().item()}")
        if not bad:
            return True
        msg = f"non-finite loss at iteration {current_iter}: {', '.join(bad)}"
        if self.nonfinite_mode == "skip":
            self.skipped_steps += 1
            get_root_logger().warning(f"{msg}; step skipped (train.nonfinite: skip, {self.skipped_steps} so far)")
            return False
        raise RuntimeError(f"{msg} (set train.nonfinite: skip to skip such steps)")

    def finish_step(self, loss_dict: Mapping[str, torch.Tensor], stepped: bool) -> None:
        """Reduce ``loss_dict`` into ``log_dict`` (keeping grad norms) and update the EMA when a step was taken."""
        extra = {k: v for k, v in self.log_dict.items() if k.startswith("grad_norm_")}
        self.log_dict = self.reduce_loss_dict(OrderedDict((k, v.detach().float()) for k, v in loss_dict.items()))
        self.log_dict.update(extra)
        if self.skipped_steps:
            self.log_dict["skipped_steps"] = float(self.skipped_steps)
        if stepped and getattr(self, "ema_decay", 0) > 0:
            self.model_ema(decay=self.ema_decay)

    def optimize_parameters(self, current_iter: int) -> None:
        """Generic step: ``net_g(lq)`` vs ``gt`` with ``pixel_opt`` / ``perceptual_opt`` (stock SRModel losses)."""
        self.set_train_mode()
        self.log_dict = OrderedDict()
        self.optimizer_g.zero_grad(set_to_none=True)
        with self.autocast():
            self.output = self.net_g(self.lq)
        output = self.output.float()
        loss_dict = OrderedDict()
        if self.cri_pix:
            loss_dict["l_pix"] = self.cri_pix(output, self.gt)
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(output, self.gt)
            if l_percep is not None:
                loss_dict["l_percep"] = l_percep
            if l_style is not None:
                loss_dict["l_style"] = l_style
        stepped = self.check_finite(loss_dict, current_iter)
        if stepped:
            self.backward_and_step(sum(loss_dict.values()), self.optimizer_g, "g", current_iter)
        self.finish_step(loss_dict, stepped)

    @torch.no_grad()
    def model_ema(self, decay: float = 0.999) -> None:
        """EMA of ``net_g``'s trainable parameters into ``net_g_ema``; frozen parameters and all buffers (e.g.
        ActNorm init flags, calibrated NAT thresholds) are copied exactly.

        (An EMA update of a constant tensor, ``p * d + p * (1 - d)``, drifts by float rounding; copying keeps the
        frozen part of ``params_ema`` bit-identical to the loaded weights.)
        """
        net_g = self.get_bare_model(self.net_g)
        src = dict(net_g.named_parameters())
        for k, p in self.net_g_ema.named_parameters():
            if src[k].requires_grad:
                p.mul_(decay).add_(src[k].data, alpha=1 - decay)
            else:
                p.copy_(src[k].data)
        src_buf = dict(net_g.named_buffers())
        for k, b in self.net_g_ema.named_buffers():
            b.copy_(src_buf[k])

    # ------------------------------------------------------------------ inference / validation
    def inference_net(self) -> nn.Module:
        """``net_g_ema`` when it exists and ``val.use_ema`` (default true), else ``net_g``."""
        if hasattr(self, "net_g_ema") and (self.opt.get("val") or {}).get("use_ema", True):
            return self.net_g_ema
        return self.net_g

    def forward_test(self, net: nn.Module, lq: torch.Tensor) -> torch.Tensor:
        """Hook: the enhanced image (B,3,H,W) for an input (B,3,H,W) already padded as required (:meth:`test`)."""
        return net(lq)

    def required_multiple(self) -> int:
        """Input sizes the inference network needs (its ``downscale`` attribute, e.g. 4 for GLARE; else 1)."""
        return int(getattr(self.get_bare_model(self.inference_net()), "downscale", 1))

    def pad_for_test(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Reflect-pad (B,C,H,W) by ``val.extra_pad`` ([bottom, left]), then up to a multiple of
        ``lcm(val.pad_multiple, required_multiple())`` (bottom / right): the one padding before the network
        (:func:`~glare_nat_arch.padding.pad_to_multiple`; the networks do not pad).

        Returns the padded tensor and the crop ``(top, height, left, width)`` that restores the original frame.
        """
        val_opt = self.opt.get("val") or {}
        bottom, left = (int(v) for v in (val_opt.get("extra_pad") or (0, 0)))
        mult = math.lcm(int(val_opt.get("pad_multiple", 1) or 1), self.required_multiple())
        x, (h, w) = pad_to_multiple(x, mult, border=(bottom, left))
        return x, (0, h, left, w)

    def test(self) -> None:
        """Run :meth:`forward_test` on ``self.lq`` (padded, autocast ``val.amp``); ``self.output`` float, cropped."""
        net = self.inference_net()
        was_training = net.training
        net.eval()
        lq, (top, h, left, w) = self.pad_for_test(self.lq)
        with torch.no_grad(), self.autocast(self.val_amp_dtype):
            out = self.forward_test(net, lq)
        self.output = out[..., top : top + h, left : left + w].float()
        if was_training:
            net.train()

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img) -> None:
        """Stock SRModel validation; metrics additionally get ``img_float`` / ``img2_float`` (HWC BGR, [0,1])."""
        dataset_name = dataloader.dataset.opt["name"]
        val_opt = self.opt["val"]
        with_metrics = val_opt.get("metrics") is not None
        use_pbar = val_opt.get("pbar", False)
        if with_metrics:
            self.metric_results = {metric: 0 for metric in val_opt["metrics"].keys()}
            self._initialize_best_metric_results(dataset_name)
        pbar = tqdm(total=len(dataloader), unit="image") if use_pbar else None
        n_images = 0
        for val_data in dataloader:
            n_images += 1
            img_name = osp.splitext(osp.basename(val_data["lq_path"][0]))[0]
            self.feed_data(val_data)
            self.test()
            visuals = self.get_current_visuals()
            metric_data = {
                "img": tensor2img([visuals["result"]]),
                "img_float": tensor2img([visuals["result"]], out_type=np.float64),
            }
            if "gt" in visuals:
                metric_data["img2"] = tensor2img([visuals["gt"]])
                metric_data["img2_float"] = tensor2img([visuals["gt"]], out_type=np.float64)
                del self.gt
            del self.lq
            del self.output
            if save_img:
                imwrite(metric_data["img"], self._save_img_path(img_name, dataset_name, current_iter))
            if with_metrics:
                for name, opt_ in val_opt["metrics"].items():
                    self.metric_results[name] += calculate_metric(metric_data, opt_)
            if pbar is not None:
                pbar.update(1)
                pbar.set_description(f"Test {img_name}")
        if pbar is not None:
            pbar.close()
        if with_metrics and n_images:
            for metric in self.metric_results.keys():
                self.metric_results[metric] /= n_images
                self._update_best_metric_result(dataset_name, metric, self.metric_results[metric], current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    def _save_img_path(self, img_name: str, dataset_name: str, current_iter) -> str:
        vis = self.opt["path"]["visualization"]
        if self.opt["is_train"]:
            return osp.join(vis, img_name, f"{img_name}_{current_iter}.png")
        suffix = self.opt["val"]["suffix"] or self.opt["name"]
        return osp.join(vis, dataset_name, f"{img_name}_{suffix}.png")
