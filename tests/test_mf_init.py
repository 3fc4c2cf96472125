"""``train.mf_init``: D_MF starts from the VQGAN decoder (``nl_decoder``) or as built (``random``, official), in
both Stage-III models; a Stage-III checkpoint still wins."""

from __future__ import annotations

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import pytest
import torch
from basicsr.models import build_model

import glare_nat_models  # noqa: F401  (registers archs, datasets, losses, metrics, models)
from glare_nat_models.glare_aft_model import init_mf_decoder
from tests.nat_model_helpers import make_nat_checkpoints, make_opt, snapshot, stage3_paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    return make_nat_checkpoints(tmp_path_factory.mktemp("mf_init_ckpts"))


def _nl_pairs(model):
    """(D_NL tensor, D_MF tensor) pairs that ``nl_decoder`` copies."""
    mf = model.get_bare_model(model.net_g).deformable_decoder.state_dict()
    for key, value in model.net_vq.decoder.state_dict().items():
        yield value, mf[key.replace("conv_out.", "residual_conv.") if key.startswith("conv_out.") else key]


@pytest.mark.parametrize("name", ["tiny_stage3_aft.yml", "tiny_stage3_nat.yml"])
def test_nl_decoder_init_copies_the_vqgan_decoder_into_d_mf(name, tmp_path, ckpts):
    paths = {"pretrain_network_vq": ckpts["vq"], "pretrain_network_stage2": ckpts["stage2"]}
    if name == "tiny_stage3_nat.yml":
        paths["pretrain_network_nat2"] = stage3_paths(ckpts)["pretrain_network_nat2"]
    opt = make_opt(name, tmp_path / "a", paths)
    torch.manual_seed(0)
    plain = build_model(opt)
    assert not all(torch.equal(a, b) for a, b in _nl_pairs(plain))  # random D_MF differs from D_NL
    opt = make_opt(name, tmp_path / "b", paths)
    opt["train"]["mf_init"] = "nl_decoder"
    torch.manual_seed(0)
    warm = build_model(opt)
    assert all(torch.equal(a, b) for a, b in _nl_pairs(warm))
    bare_plain, bare_warm = (m.get_bare_model(m.net_g).deformable_decoder for m in (plain, warm))
    copied = {k for k in bare_warm.state_dict() if k.startswith(("conv_in.", "mid.", "up.", "norm_out.", "residual"))}
    rest_plain, rest_warm = snapshot(bare_plain), snapshot(bare_warm)
    for k in rest_warm:  # the fusion layers (mix, warp) and the unused official tensors are untouched
        if k not in copied:
            assert torch.equal(rest_plain[k], rest_warm[k]), k


def test_a_stage3_checkpoint_wins_over_mf_init(tmp_path, ckpts):
    opt = make_opt("tiny_stage3_nat.yml", tmp_path, stage3_paths(ckpts))  # D_MF from the Stage-III file
    opt["train"]["mf_init"] = "nl_decoder"
    model = build_model(opt)
    assert not all(torch.equal(a, b) for a, b in _nl_pairs(model))


def test_bad_mf_init_is_named():
    with pytest.raises(ValueError, match=r"train\.mf_init = 'vq'"):
        init_mf_decoder(torch.nn.Module(), torch.nn.Module(), "vq")
