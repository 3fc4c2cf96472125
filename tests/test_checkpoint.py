"""Checkpoint helpers: atomic writes, unreadable files, key selection, strict-load reports."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)
from glare_nat_models import checkpoint as ckpt
from glare_nat_models.checkpoint import (
    CheckpointError,
    StrictLoadError,
    atomic_torch_save,
    compare_state_dicts,
    load_network_file,
    load_state_dict_checked,
    read_checkpoint,
    select_state_dict,
)


class _Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, width, 3)
        self.b = nn.Linear(width, 2)


def _failing_save(obj, f, *args, **kwargs):
    """Write some bytes, then fail like a full disk."""
    f.write(b"PK\x03\x04 partial checkpoint bytes")
    raise OSError(28, "No space left on device")


def test_atomic_save_writes_loadable_file_and_no_tmp(tmp_path):
    path = tmp_path / "net_g_1.pth"
    atomic_torch_save({"params": _Net().state_dict()}, path)
    assert sorted(os.listdir(tmp_path)) == ["net_g_1.pth"]
    assert set(read_checkpoint(path)["params"]) == set(_Net().state_dict())


def test_atomic_save_failure_keeps_previous_file_and_leaves_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "net_g_latest.pth"
    old = {"params": {"w": torch.arange(5.0)}}
    atomic_torch_save(old, path)
    before = path.read_bytes()
    monkeypatch.setattr(ckpt.torch, "save", _failing_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"params": {"w": torch.zeros(5)}}, path)
    assert sorted(os.listdir(tmp_path)) == ["net_g_latest.pth"]  # no *.tmp left behind
    assert path.read_bytes() == before
    monkeypatch.undo()
    torch.testing.assert_close(read_checkpoint(path)["params"]["w"], torch.arange(5.0))


def test_atomic_save_failure_without_previous_file_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.torch, "save", _failing_save)
    with pytest.raises(OSError):
        atomic_torch_save({"x": torch.ones(1)}, tmp_path / "5.state")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("keep", [0, 10, 200, -20])
def test_truncated_or_empty_checkpoint_error_names_file(tmp_path, keep):
    good = tmp_path / "good.pth"
    torch.save({"params": _Net().state_dict()}, good)
    data = good.read_bytes()
    bad = tmp_path / "net_g_truncated.pth"
    bad.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(CheckpointError, match="net_g_truncated.pth"):
        read_checkpoint(bad)


def test_missing_and_garbage_files_error_names_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        read_checkpoint(garbage)


def test_select_state_dict_keys_and_errors():
    sd = {"module.a.weight": torch.ones(1), "b": torch.zeros(1)}
    assert set(select_state_dict({"params": sd}, "params", "f.pth")) == {"a.weight", "b"}
    # params_ema missing -> falls back to params (stock BasicSR behaviour)
    assert set(select_state_dict({"params": sd}, "params_ema", "f.pth")) == {"a.weight", "b"}
    # bare state dict (official net_G.pth) with param_key ~
    assert set(select_state_dict(sd, None, "f.pth")) == {"a.weight", "b"}
    with pytest.raises(CheckpointError, match=r"f.pth has no key 'params'.*set param_key_\* to ~"):
        select_state_dict(sd, "params", "f.pth")
    with pytest.raises(CheckpointError, match=r"f.pth: param_key is ~ .*'params'"):
        select_state_dict({"params": sd}, None, "f.pth")
    with pytest.raises(CheckpointError, match="has no key 'state_dict'"):
        select_state_dict({"params": sd, "other": 1}, "state_dict", "f.pth")


def test_report_lists_missing_unexpected_and_mismatched():
    net = _Net(width=4)
    loaded = dict(_Net(width=5).state_dict())  # a.* and b.weight mismatch in shape
    loaded.pop("b.bias")
    loaded["extra.weight"] = torch.ones(2)
    report = compare_state_dicts(net.state_dict(), loaded)
    assert report.missing == ["b.bias"]
    assert report.unexpected == ["extra.weight"]
    assert [k for k, _, _ in report.mismatched] == ["a.bias", "a.weight", "b.weight"]
    assert ("a.weight", (4, 3, 3, 3), (5, 3, 3, 3)) in report.mismatched
    text = report.format()
    expected = ("missing keys", "b.bias", "unexpected keys", "extra.weight", "a.weight: [4, 3, 3, 3] vs [5, 3, 3, 3]")
    for fragment in expected:
        assert fragment in text
    assert compare_state_dicts(net.state_dict(), net.state_dict()).ok


def test_strict_load_raises_with_report_and_loads_nothing():
    net = _Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = {k: torch.full_like(v, 7.0) for k, v in _Net().state_dict().items()}
    bad["surprise"] = torch.zeros(1)
    with pytest.raises(StrictLoadError, match="(?s)my.pth.*unexpected keys.*surprise") as info:
        load_state_dict_checked(net, bad, strict=True, source="my.pth")
    assert info.value.report.unexpected == ["surprise"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_non_strict_load_logs_report_skips_mismatch_and_loads_rest(caplog):
    net = _Net(width=4)
    loaded = {k: torch.full_like(v, 3.0) for k, v in net.state_dict().items()}
    loaded["a.weight"] = torch.ones(5, 3, 3, 3)
    old_a = net.a.weight.detach().clone()
    with caplog.at_level("WARNING", logger="basicsr"):
        report = load_state_dict_checked(net, loaded, strict=False, source="x.pth")
    assert report.mismatched and "Non-strict load" in caplog.text and "a.weight" in caplog.text
    assert torch.equal(net.a.weight, old_a)
    assert torch.all(net.b.weight == 3.0)


def test_prefixes_restrict_expected_keys(tmp_path):
    net = _Net()
    part = {k: torch.full_like(v, 2.0) for k, v in net.state_dict().items() if k.startswith("a.")}
    path = tmp_path / "stage2.pth"
    torch.save({"params": part}, path)
    b_before = net.b.weight.detach().clone()
    report = load_network_file(net, path, "params", strict=True, prefixes=("a.",))
    assert report.ok and torch.all(net.a.weight == 2.0) and torch.equal(net.b.weight, b_before)
    # a file with keys outside the prefixes is rejected, naming them
    torch.save({"params": dict(net.state_dict())}, path)
    with pytest.raises(StrictLoadError, match="(?s)only a. expected.*b.weight"):
        load_network_file(net, path, "params", strict=True, prefixes=("a.",))


def test_drop_prefixes_removes_documented_unused_keys(tmp_path):
    net = _Net()
    sd = dict(net.state_dict())
    sd["conv_semantic.0.weight"] = torch.ones(1)
    path = tmp_path / "vqgan.pkl"
    torch.save(sd, path)
    with pytest.raises(StrictLoadError):
        load_network_file(net, path, None, strict=True)
    assert load_network_file(net, path, None, strict=True, drop_prefixes=("conv_semantic.",)).ok
