"""The three GLARE training stages as BasicSR models, built from the tiny YAMLs in tests/data/ (CPU, seconds)."""

from __future__ import annotations

import os
from collections import OrderedDict
from copy import deepcopy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from basicsr.models import build_model
from basicsr.utils.options import ordered_yaml
from torch.utils.data import DataLoader

import glare_nat_models  # noqa: F401  (registers archs, datasets, losses, metrics, models)
from glare_nat_models import base_model as base_mod
from glare_nat_models import checkpoint as ckpt_mod
from glare_nat_models.checkpoint import CheckpointError, StrictLoadError

DATA = Path(__file__).resolve().parent / "data"
STAGES = ("tiny_stage1_vqgan.yml", "tiny_stage2_flow.yml", "tiny_stage3_aft.yml")


def read_yaml(name: str) -> dict:
    with open(DATA / name, encoding="utf-8") as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def make_opt(name: str, out_dir: Path, ckpts: dict[str, str], is_train: bool = True, **path) -> dict:
    """Options as BasicSR's parse_options would produce them (CPU, no dist), outputs under ``out_dir``."""
    opt = read_yaml(name)
    opt.update(is_train=is_train, dist=False, rank=0, world_size=1, num_gpu=0)
    dirs = {k: str(out_dir / k) for k in ("models", "training_states", "visualization", "log")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    opt["path"].update(dirs)
    if "network_vq" in opt:
        opt["path"]["pretrain_network_vq"] = ckpts["vq"]
    if name == "tiny_stage3_aft.yml":
        opt["path"]["pretrain_network_stage2"] = ckpts["stage2"]
    opt["path"].update(path)
    return opt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """A tiny VQGAN and a tiny Stage-II checkpoint (BasicSR format), matching the tiny YAMLs."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    vq = build_network(deepcopy(read_yaml("tiny_stage2_flow.yml")["network_vq"]))
    flow = build_network(deepcopy(read_yaml("tiny_stage2_flow.yml")["network_g"]))
    torch.save({"params": vq.state_dict()}, d / "vq.pth")
    torch.save({"params": flow.state_dict()}, d / "stage2.pth")
    return {"vq": str(d / "vq.pth"), "stage2": str(d / "stage2.pth")}


def batch(seed: int = 0, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(2, 3, size, size, generator=g)
    return {"lq": gt * 0.1, "gt": gt, "lq_path": ["a.png", "b.png"]}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def frozen_and_trainable(model) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """(frozen modules, trainable modules) of each stage's model."""
    net = model.get_bare_model(model.net_g)
    if type(model).__name__ == "VQGANModel":
        return [], [net, model.net_d]
    if type(model).__name__ == "GLAREFlowModel":
        return [model.net_vq], [net]
    return [model.net_vq, net.RRDB, net.flowUpsamplerNet], [net.deformable_decoder]


@pytest.mark.parametrize("name", STAGES)
def test_two_steps_train_only_trainable_parts(name, tmp_path, ckpts):
    opt = make_opt(name, tmp_path, ckpts)
    if name == "tiny_stage2_flow.yml":  # the colour-map prior branch in both steps, so every head gets a gradient
        opt["train"]["train_gt_ratio"] = 0.0
    model = build_model(opt)
    frozen, trainable = frozen_and_trainable(model)
    before_frozen = [snapshot(m) for m in frozen]
    before_train = [snapshot(m) for m in trainable]

    in_optim = {id(p) for o in model.optimizers for g in o.param_groups for p in g["params"]}
    for m in frozen:
        assert all(not p.requires_grad and id(p) not in in_optim for p in m.parameters())
        assert not m.training
    for m in trainable:
        assert all(id(p) in in_optim for p in m.parameters() if p.requires_grad)

    for it in (1, 2):
        model.feed_data(batch(it))
        model.optimize_parameters(it)
        log = model.get_current_log()
        assert log and all(np.isfinite(v) for v in log.values()), log

    # every trainable parameter got a gradient (no unused trainable weights: DDP-safe without find_unused)
    trainable_params = [(n, p) for m in trainable for n, p in m.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable_params if p.grad is None] == []

    for m, snap in zip(frozen, before_frozen):
        assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items()), "a frozen part changed"
        assert not m.training, "a frozen part left eval mode"
    for m, snap in zip(trainable, before_train):
        changed = [k for k, v in m.state_dict().items() if v.is_floating_point() and not torch.equal(v, snap[k])]
        assert changed, f"{type(m).__name__} did not train"

    # test() (train -> eval -> train) and an explicit net_g.train() keep the frozen parts in eval mode
    model.feed_data(batch(5))
    model.test()
    assert model.output.shape == (2, 3, 32, 32) and torch.all((model.output >= 0) & (model.output <= 1))
    model.net_g.train()
    assert all(not m.training for m in frozen)


def test_stage1_gan_terms_follow_disc_start(tmp_path, ckpts):
    opt = make_opt("tiny_stage1_vqgan.yml", tmp_path, ckpts)
    opt["train"]["disc_start"] = 1
    model = build_model(opt)
    d_before = snapshot(model.net_d)
    model.feed_data(batch(1))
    model.optimize_parameters(1)  # iteration 1 <= disc_start: no GAN term, discriminator untouched
    assert "l_g_gan" not in model.get_current_log() and "l_d_real" not in model.get_current_log()
    assert all(torch.equal(v, d_before[k]) for k, v in model.net_d.state_dict().items() if k.endswith("weight"))
    model.optimize_parameters(2)
    log = model.get_current_log()
    assert {"l_g_gan", "d_weight", "l_d_real", "l_d_fake"} <= set(log) and log["d_weight"] > 0


@pytest.mark.parametrize("name", STAGES)
def test_save_load_round_trip_restores_outputs(name, tmp_path, ckpts):
    opt = make_opt(name, tmp_path, ckpts)
    opt["train"]["ema_decay"] = 0.5
    model = build_model(opt)
    for it in (1, 2):
        model.feed_data(batch(it))
        model.optimize_parameters(it)
    model.save(epoch=0, current_iter=2)
    saved = torch.load(tmp_path / "models" / "net_g_2.pth", weights_only=True)
    assert set(saved) == {"params", "params_ema"}
    assert os.path.isfile(tmp_path / "training_states" / "2.state")
    assert not [f for f in os.listdir(tmp_path / "models") if f.endswith(".tmp")]
    if name == "tiny_stage3_aft.yml":  # like the official net_G.pth: E_c + flow + D_MF, no VQGAN
        prefixes = {k.split(".")[0] for k in saved["params"]}
        assert prefixes == {"RRDB", "flowUpsamplerNet", "deformable_decoder"}

    model.feed_data(batch(7))
    model.test()  # uses net_g_ema
    expected = model.output.clone()

    test_opt = make_opt(
        name, tmp_path, ckpts, is_train=False, pretrain_network_g=str(tmp_path / "models" / "net_g_2.pth")
    )
    test_opt["path"]["param_key_g"] = "params_ema"
    reloaded = build_model(test_opt)
    reloaded.feed_data(batch(7))
    reloaded.test()
    torch.testing.assert_close(reloaded.output, expected, rtol=0, atol=1e-6)


def test_bare_official_layout_files_load_with_param_key_none(tmp_path, ckpts):
    """Official net_G.pth / vqgan.pkl are bare state dicts (param_key ~); the VQGAN's unused keys are dropped."""
    train_model = build_model(make_opt("tiny_stage3_aft.yml", tmp_path, ckpts))
    torch.save(dict(train_model.net_g.state_dict()), tmp_path / "net_G.pth")
    vq_sd = dict(torch.load(ckpts["vq"], weights_only=True)["params"])
    vq_sd["conv_semantic.0.weight"] = torch.zeros(256, 3, 1, 1)  # present in the official vqgan.pkl, never used
    torch.save(vq_sd, tmp_path / "vqgan.pkl")
    opt = make_opt(
        "tiny_stage3_aft.yml",
        tmp_path,
        ckpts,
        is_train=False,
        pretrain_network_g=str(tmp_path / "net_G.pth"),
        pretrain_network_vq=str(tmp_path / "vqgan.pkl"),
        param_key_g=None,
        param_key_vq=None,
    )
    model = build_model(opt)
    for (k, v), ref in zip(model.net_g.state_dict().items(), train_model.net_g.state_dict().values()):
        assert torch.equal(v, ref), k
    opt["path"]["param_key_g"] = "params"  # wrong key for a bare file: a clear error, naming file and fix
    with pytest.raises(CheckpointError, match=r"net_G.pth has no key 'params'.*set param_key_\* to ~"):
        build_model(opt)


def test_failed_checkpoint_write_keeps_previous_and_leaves_no_partial(tmp_path, ckpts, monkeypatch):
    model = build_model(make_opt("tiny_stage2_flow.yml", tmp_path, ckpts))
    model.save_network(model.net_g, "net_g", -1)
    target = tmp_path / "models" / "net_g_latest.pth"
    before = target.read_bytes()

    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    monkeypatch.setattr(base_mod.GLAREBaseModel, "_save_retry_delay", 0.0)
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    with pytest.raises(OSError, match="cannot save .*net_g_latest.pth"):
        model.save_network(model.net_g, "net_g", -1)
    with pytest.raises(OSError, match="cannot save .*1.state"):
        model.save_training_state(0, 1)
    assert len(calls) == 2 * model._save_retries
    assert sorted(os.listdir(tmp_path / "models")) == ["net_g_latest.pth"]
    assert os.listdir(tmp_path / "training_states") == []
    assert target.read_bytes() == before


def test_truncated_checkpoint_names_file(tmp_path, ckpts):
    data = Path(ckpts["vq"]).read_bytes()
    bad = tmp_path / "vq_truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated: .*vq_truncated.pth"):
        build_model(make_opt("tiny_stage2_flow.yml", tmp_path, ckpts, pretrain_network_vq=str(bad)))


def test_strict_load_report_and_opt_in_non_strict(tmp_path, ckpts, caplog):
    """A Stage-II file with a missing, an extra and a mis-shaped key: strict raises a readable report."""
    sd = torch.load(ckpts["stage2"], weights_only=True)["params"]
    missing = "RRDB.color_conv.bias"
    sd.pop(missing)
    sd["deformable_decoder.mix.0.w"] = torch.zeros(1)  # not a Stage-II key
    sd["RRDB.color_conv.weight"] = torch.zeros(3, 3, 1, 1)
    path = tmp_path / "bad_stage2.pth"
    torch.save({"params": sd}, path)
    with pytest.raises(StrictLoadError) as info:
        build_model(make_opt("tiny_stage3_aft.yml", tmp_path, ckpts, pretrain_network_stage2=str(path)))
    msg = str(info.value)
    assert "bad_stage2.pth" in msg and "only RRDB., flowUpsamplerNet. expected" in msg
    assert f"missing keys (in the network, not in the file) (1):\n  {missing}" in msg
    assert "unexpected keys (in the file, not in the network) (1):\n  deformable_decoder.mix.0.w" in msg
    assert "RRDB.color_conv.weight: [3, 3, 3, 3] vs [3, 3, 1, 1]" in msg

    opt = make_opt("tiny_stage3_aft.yml", tmp_path, ckpts, pretrain_network_stage2=str(path))
    opt["path"]["strict_load_stage2"] = False
    with caplog.at_level("WARNING", logger="basicsr"):
        model = build_model(opt)
    assert "Non-strict load" in caplog.text and missing in caplog.text
    assert torch.equal(model.net_g.RRDB.cond_conv[0].weight, sd["RRDB.cond_conv.0.weight"])


def test_stage3_requires_stage2_weights(tmp_path, ckpts):
    with pytest.raises(KeyError, match="pretrain_network_stage2"):
        build_model(make_opt("tiny_stage3_aft.yml", tmp_path, ckpts, pretrain_network_stage2=None))


def _nan_loss(monkeypatch, model):
    """Make the Stage-III L1 term NaN."""

    def nan_l1(pred, target):
        return (pred - target).abs().mean() * float("nan")

    monkeypatch.setattr(model, "cri_pix", nan_l1)


def test_nonfinite_loss_raises_naming_iteration_and_term(tmp_path, ckpts, monkeypatch):
    model = build_model(make_opt("tiny_stage3_aft.yml", tmp_path, ckpts))
    _nan_loss(monkeypatch, model)
    model.feed_data(batch(1))
    with pytest.raises(RuntimeError, match=r"non-finite loss at iteration 17: l_pix=nan"):
        model.optimize_parameters(17)


def test_nonfinite_loss_skip_mode_skips_step(tmp_path, ckpts, monkeypatch):
    opt = make_opt("tiny_stage3_aft.yml", tmp_path, ckpts)
    opt["train"]["nonfinite"] = "skip"
    model = build_model(opt)
    before = snapshot(model.net_g)
    _nan_loss(monkeypatch, model)
    model.feed_data(batch(1))
    model.optimize_parameters(3)
    assert all(torch.equal(v, before[k]) for k, v in model.net_g.state_dict().items())
    assert model.get_current_log()["skipped_steps"] == 1
    monkeypatch.undo()
    model.optimize_parameters(4)  # a finite step afterwards trains again
    assert any(not torch.equal(v, before[k]) for k, v in model.net_g.state_dict().items())


def test_grad_clip_bf16_and_fp16_fallback_on_cpu(tmp_path, ckpts, caplog):
    opt = make_opt("tiny_stage2_flow.yml", tmp_path, ckpts)
    opt["train"].update(grad_clip=1e-3, amp="bf16")
    model = build_model(opt)
    assert model.amp_dtype is torch.bfloat16
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert np.isfinite(log["l_nll"]) and log["grad_norm_g"] > 1e-3
    grads = [p.grad for p in model.net_g.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) <= 1e-3 * 1.01

    opt["train"]["amp"] = "fp16"
    with caplog.at_level("WARNING", logger="basicsr"):
        model = build_model(opt)
    assert model.amp_dtype is None and "fp16 autocast needs CUDA" in caplog.text
    opt["train"]["amp"] = "fp8"
    with pytest.raises(ValueError, match="train.amp"):
        build_model(opt)


class _PairList(torch.utils.data.Dataset):
    def __init__(self, n: int = 2) -> None:
        self.opt = {"name": "tiny_val"}
        self.items = []
        for i in range(n):
            b = batch(10 + i, size=28)  # not a multiple of 4: the model pads and crops back
            self.items.append({"lq": b["lq"][0], "gt": b["gt"][0], "lq_path": f"img{i}.png"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def test_validation_passes_uint8_and_float_images_and_saves(tmp_path, ckpts, monkeypatch):
    opt = make_opt("tiny_stage2_flow.yml", tmp_path, ckpts)
    seen = []
    real = base_mod.calculate_metric

    def spy(data, metric_opt):
        seen.append({k: (v.dtype, v.shape) for k, v in data.items()})
        return real(data, metric_opt)

    monkeypatch.setattr(base_mod, "calculate_metric", spy)
    model = build_model(opt)
    model.validation(DataLoader(_PairList(), batch_size=1), current_iter=3, tb_logger=None, save_img=True)
    assert len(seen) == 2
    assert seen[0]["img"] == (np.uint8, (28, 28, 3)) and seen[0]["img2"] == (np.uint8, (28, 28, 3))
    assert seen[0]["img_float"] == (np.float64, (28, 28, 3)) and seen[0]["img2_float"][0] == np.float64
    assert np.isfinite(model.metric_results["psnr"])
    assert os.path.isfile(tmp_path / "visualization" / "img0" / "img0_3.png")


def test_base_model_trains_a_stock_arch(tmp_path, ckpts):
    """GLAREBaseModel alone is SRModel with the reliability features (e.g. for baselines)."""
    opt = {
        "name": "base",
        "model_type": "GLAREBaseModel",
        "network_g": {"type": "SRVGGNetCompact", "num_feat": 8, "num_conv": 1, "upscale": 1},
        "path": {},
        "train": {
            "optim_g": {"type": "AdamW", "lr": 1e-3},
            "scheduler": {"type": "MultiStepLR", "milestones": [10], "gamma": 0.5},
            "pixel_opt": {"type": "L1Loss"},
            "grad_clip": 1.0,
        },
    }
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0)
    model = build_model(opt)
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    assert set(model.get_current_log()) == {"l_pix", "grad_norm_g"}
    assert opt["train"]["optim_g"]["type"] == "AdamW"  # option dicts are not consumed


def write_lol_tree(root: Path, n_train: int = 3, n_test: int = 2, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("our485", n_train), ("eval15", n_test)):
        for sub in ("low", "high"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            gt = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            cv2.imwrite(str(root / split / "high" / f"{i}.png"), gt)
            cv2.imwrite(str(root / split / "low" / f"{i}.png"), (gt // 8).astype(np.uint8))


def test_stock_train_pipeline_runs_stage3(tmp_path, ckpts, monkeypatch):
    """Stage III through basicsr.train.train_pipeline: training, atomic checkpoints, validation on a holdout."""
    from basicsr.train import train_pipeline
    from glare_nat_models.launcher import patch_basicsr

    patch_basicsr()
    write_lol_tree(tmp_path / "lol")
    opt = read_yaml("tiny_stage3_aft.yml")
    opt["num_gpu"] = "auto"
    opt["path"].update(pretrain_network_vq=ckpts["vq"], pretrain_network_stage2=ckpts["stage2"])
    opt["datasets"] = {
        "train": {
            "name": "tiny_train",
            "type": "LOLPairedDataset",
            "dataroot": str(tmp_path / "lol"),
            "layout": "lolv1",
            "split": "train",
            "holdout": {"count": 1, "seed": 0, "role": "train"},
            "gt_size": 16 * 2,
            "use_hflip": True,
            "batch_size_per_gpu": 2,
            "num_worker_per_gpu": 0,
            "dataset_enlarge_ratio": 1,
        },
        "val": {
            "name": "tiny_holdout",
            "type": "LOLPairedDataset",
            "dataroot": str(tmp_path / "lol"),
            "layout": "lolv1",
            "split": "train",
            "holdout": {"count": 1, "seed": 0, "role": "val"},
        },
    }
    opt["val"].update(val_freq=2, save_img=False)
    opt["logger"] = {"print_freq": 1, "save_checkpoint_freq": 2, "use_tb_logger": False}
    opt_file = tmp_path / "opt.yml"
    opt_file.write_text(yaml.safe_dump(dict(_plain(opt))))
    monkeypatch.setattr("sys.argv", ["train.py", "-opt", str(opt_file)])
    validations = []
    real_validation = base_mod.GLAREBaseModel.nondist_validation

    def record(self, dataloader, current_iter, *args):
        real_validation(self, dataloader, current_iter, *args)
        validations.append((dataloader.dataset.opt["name"], current_iter, dict(self.metric_results)))

    monkeypatch.setattr(base_mod.GLAREBaseModel, "nondist_validation", record)
    train_pipeline(str(tmp_path))
    exp = tmp_path / "experiments" / "test_stage3_aft"
    assert sorted(os.listdir(exp / "models")) == ["net_g_2.pth", "net_g_latest.pth"]
    assert os.listdir(exp / "training_states") == ["2.state"]
    assert [(name, it) for name, it, _ in validations] == [
        ("tiny_holdout", 2),
        ("tiny_holdout", 3),
    ]  # stock: final one "@ total_iter + 1"
    assert all(np.isfinite(r["psnr"]) and np.isfinite(r["psnr_gtmean"]) for _, _, r in validations)


def _plain(obj):
    if isinstance(obj, (dict, OrderedDict)):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


@pytest.mark.parametrize("name", STAGES[1:])
def test_fixed_seed_training_is_bit_for_bit_repeatable_on_cpu(name, tmp_path, ckpts):
    from basicsr.utils import set_random_seed

    finals = []
    for run in range(2):
        set_random_seed(10)
        opt = make_opt(name, tmp_path / f"run{run}", ckpts)
        opt["deterministic"] = True  # the GPU switch; must be harmless on CPU
        model = build_model(opt)
        for it in (1, 2):
            model.feed_data(batch(it))
            model.optimize_parameters(it)
        finals.append(snapshot(model.net_g))
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    torch.use_deterministic_algorithms(False)


def test_stage2_flow_target_is_float32_outside_autocast(tmp_path, ckpts):
    """The NLL target ``quant_conv(E(gt))`` is computed in float32 with autocast off even when training runs under
    autocast (bf16 here, on the CPU), as the official training computes it; only the flow pass autocasts."""
    opt = make_opt("tiny_stage2_flow.yml", tmp_path, ckpts)
    opt["train"]["amp"] = "bf16"
    model = build_model(opt)
    seen = []
    encode = model.net_vq.encode

    def spy(x):
        out = encode(x)
        seen.append((torch.is_autocast_enabled("cpu"), x.dtype, out.dtype))
        return out

    model.net_vq.encode = spy
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    assert seen == [(False, torch.float32, torch.float32)]
    assert np.isfinite(model.get_current_log()["l_nll"])


def test_stage1_gan_range_ramp_codebook_init_and_usage(tmp_path, ckpts):
    """Stage I: the discriminator sees [-1, 1] images (taming's range); the generator's GAN term ramps in over
    ``disc_warmup`` with the adaptive weight capped at ``d_weight_max``; ``codebook_init: encoder`` puts every code
    on an encoder latent of the first batch; validation reports codes used and perplexity."""
    from glare_nat_models.vqgan_model import codebook_usage

    opt = make_opt("tiny_stage1_vqgan.yml", tmp_path, ckpts)
    opt["train"].update(disc_start=1, disc_warmup=4, d_weight_max=0.5, codebook_init="encoder")
    opt["train"]["optim_g"]["lr"] = 0.0  # the generator keeps its weights: codes stay where the init put them
    model = build_model(opt)
    net_g = model.get_bare_model(model.net_g)
    assert [model.gan_ramp(i) for i in (1, 2, 3, 5, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    seen = []
    model.net_d.register_forward_hook(
        lambda m, args, out: seen.append((float(args[0].detach().min()), float(args[0].detach().max())))
    )
    data = batch(1)
    data["gt"] = torch.full_like(data["gt"], 0.5)
    data["gt"][:, :, :4] = 0.0
    model.feed_data(data)
    model.optimize_parameters(1)  # before disc_start: no discriminator call, codes initialised
    latents = net_g.encode(data["gt"]).permute(0, 2, 3, 1).reshape(-1, 3)
    codes = net_g.quantize.embedding.weight.detach()
    assert not seen and model.get_current_log()["codes_restarted"] == codes.shape[0]
    gap = ((codes[:, None] - latents.detach()[None]) ** 2).sum(-1).min(dim=1).values
    assert gap.max() < 1e-10  # each code is an encoder latent
    model.feed_data(data)
    model.optimize_parameters(2)
    log = model.get_current_log()
    assert log["gan_ramp"] == 0.25 and 0 < log["d_weight"] <= 0.5
    assert (-1.0, 0.0) in seen  # the real image (rows of 0, the rest 0.5) arrives in [-1, 1]
    used, perplexity = codebook_usage(torch.tensor([4, 4, 0, 0]))
    assert used == 2 and perplexity == pytest.approx(2.0)
    assert codebook_usage(torch.tensor([8, 0, 0]))[1] == pytest.approx(1.0)


def test_stage3_training_step_under_bf16_autocast_fuses_in_float32(tmp_path, ckpts):
    """A Stage-III training step under autocast (bf16 on the CPU) runs the mix-up and the deformable warp of
    every fused level in float32, as the official model does under fp16, and its losses stay finite."""
    opt = make_opt("tiny_stage3_aft.yml", tmp_path, ckpts)
    opt["train"]["amp"] = "bf16"
    model = build_model(opt)
    dmf = model.get_bare_model(model.net_g).deformable_decoder
    seen = []
    for m in (*dmf.warp, *dmf.mix):
        m.register_forward_hook(
            lambda m, args, out: seen.append([a.dtype for a in args if torch.is_tensor(a)] + [out.dtype])
        )
    model.feed_data(batch(3))
    model.optimize_parameters(1)
    assert len(seen) == 2 * len(dmf.warp) and all(set(d) == {torch.float32} for d in seen), seen
    assert all(np.isfinite(v) for v in model.get_current_log().values())
