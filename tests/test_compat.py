"""Each compatibility shim has a test that fails without it (the import aliases run in subprocesses: they are
process-global)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from glare_nat_models import exact_resume
from glare_nat_models.checkpoint import CheckpointError
from glare_nat_models.launcher import normalise_argv, patch_basicsr
from tests.conftest import REPO_ROOT

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def __init__(self, names): self.names = set(names)
        def find_spec(self, name, path=None, target=None):
            if name in self.names:
                raise ModuleNotFoundError(f"simulated removal of {name}", name=name)
            return None
    """
)

ONLY_FUNCTIONAL_TENSOR = (
    "import torchvision.transforms.functional as F, types; "
    "m = types.ModuleType('torchvision.transforms.functional_tensor'); m.rgb_to_grayscale = F.rgb_to_grayscale; "
    "sys.modules[m.__name__] = m"
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_functional_tensor_alias_needed_and_working():
    # Without the shim, stock basicsr 1.4.2 does not import on torchvision >= 0.17.
    bare = _run("import basicsr")
    assert bare.returncode != 0 and "functional_tensor" in bare.stderr
    shimmed = _run(
        """
        import glare_nat_arch, basicsr, torch
        from torchvision.transforms.functional_tensor import rgb_to_grayscale
        from torchvision.transforms import functional as F
        x = torch.rand(3, 8, 8)
        assert torch.equal(rgb_to_grayscale(x), F.rgb_to_grayscale(x))
        print("ok")
        """
    )
    assert shimmed.returncode == 0, shimmed.stderr
    assert "ok" in shimmed.stdout


def test_scipy_filters_alias_when_module_removed():
    code = BLOCKER + textwrap.dedent(
        """
        import scipy.ndimage  # scipy itself still has the old module; simulate its removal afterwards
        sys.modules.pop("scipy.ndimage.filters", None)
        sys.meta_path.insert(0, _Block(["scipy.ndimage.filters"]))
        __PRE__
        import basicsr.metrics.niqe
        print("ok")
        """
    )
    # "No shim": only the functional_tensor alias (needed for any basicsr import), not the scipy one.
    without = _run(code.replace("__PRE__", ONLY_FUNCTIONAL_TENSOR))
    assert without.returncode != 0 and "scipy.ndimage.filters" in without.stderr
    with_shim = _run(code.replace("__PRE__", "import glare_nat_arch"))
    assert with_shim.returncode == 0, with_shim.stderr


def test_loose_version_alias_when_distutils_missing():
    code = BLOCKER + textwrap.dedent(
        """
        sys.meta_path.insert(0, _Block(["distutils", "distutils.version"]))
        for m in list(sys.modules):
            if m == "distutils" or m.startswith("distutils."):
                del sys.modules[m]
        __PRE__
        import basicsr.archs.arch_util as au
        print(au.LooseVersion("0.29.1") >= au.LooseVersion("0.9.0"))
        """
    )
    with_shim = _run(code.replace("__PRE__", "import glare_nat_arch"))
    assert with_shim.returncode == 0, with_shim.stderr
    assert with_shim.stdout.strip().endswith("True")
    without = _run(code.replace("__PRE__", ONLY_FUNCTIONAL_TENSOR))
    assert without.returncode != 0 and "distutils" in without.stderr


def test_normalise_argv():
    assert normalise_argv(["train.py", "--opt", "a.yml", "--auto_resume"]) == [
        "train.py",
        "-opt",
        "a.yml",
        "--auto_resume",
    ]
    assert normalise_argv(["train.py", "--opt=a.yml"]) == ["train.py", "-opt", "a.yml"]
    assert normalise_argv(["train.py", "-opt", "a.yml"]) == ["train.py", "-opt", "a.yml"]


def _fake_training_state(tmp_path):
    states = tmp_path / "training_states"
    states.mkdir()
    for it in (4, 12):
        torch.save({"epoch": 0, "iter": it, "optimizers": [], "schedulers": []}, states / f"{it}.state")
    return states


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU failure of stock basicsr; CUDA box resumes")
def test_stock_load_resume_state_fails_on_cpu_and_ours_works(tmp_path):
    import basicsr.train as bt

    states = _fake_training_state(tmp_path)
    opt = {
        "auto_resume": False,
        "num_gpu": 0,
        "path": {"resume_state": str(states / "12.state"), "training_states": str(states)},
        "name": "x",
    }
    original = bt.load_resume_state if bt.load_resume_state is not exact_resume.load_resume_state else None
    if original is not None:
        with pytest.raises((RuntimeError, AssertionError)):
            original(dict(opt, path=dict(opt["path"])))
    state = exact_resume.load_resume_state(dict(opt, path=dict(opt["path"])))
    assert state["iter"] == 12


def test_auto_resume_uses_root_training_states_not_cwd(tmp_path, monkeypatch):
    states = _fake_training_state(tmp_path)
    monkeypatch.chdir(REPO_ROOT)
    opt = {"auto_resume": True, "num_gpu": 0, "path": {"training_states": str(states)}, "name": "x"}
    state = exact_resume.load_resume_state(opt)
    assert state["iter"] == 12
    assert opt["path"]["resume_state"] == str(states / "12.state")


def test_truncated_resume_state_is_named(tmp_path):
    states = _fake_training_state(tmp_path)
    data = (states / "12.state").read_bytes()
    (states / "12.state").write_bytes(data[: len(data) // 2])
    opt = {"auto_resume": True, "num_gpu": 0, "path": {"training_states": str(states)}, "name": "x"}
    with pytest.raises(CheckpointError, match=r"corrupt or truncated: .*12\.state"):
        exact_resume.load_resume_state(opt)


def test_patch_basicsr_replaces_resume_function():
    import basicsr.train as bt

    patch_basicsr()
    assert bt.load_resume_state is exact_resume.load_resume_state


def test_arch_and_data_do_not_import_models():
    """Layering: the network and data packages (and BasicSR's import aliases) never import ``glare_nat_models``."""
    res = _run(
        """
        import sys
        import glare_nat_arch, glare_nat_data
        print(sorted(m for m in sys.modules if m.startswith("glare_nat_models")))
        """
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_stock_models_share_the_atomic_retried_checkpoint_writes(tmp_path, monkeypatch):
    """After ``patch_basicsr`` a stock model's ``save_network`` / ``save_training_state`` are the glare-nat ones: a
    failing write is retried, then raises naming the file, and the previous file is kept (stock: ignored)."""
    from types import SimpleNamespace

    from basicsr.models.base_model import BaseModel

    from glare_nat_models import checkpoint

    patch_basicsr()
    (tmp_path / "models").mkdir()
    (tmp_path / "training_states").mkdir()
    net = torch.nn.Linear(2, 2)
    model = SimpleNamespace(
        opt={"path": {"models": str(tmp_path / "models"), "training_states": str(tmp_path / "training_states")}},
        get_bare_model=lambda n: n,
        optimizers=[torch.optim.SGD(net.parameters(), lr=0.1)],
        schedulers=[],
        _save_retry_delay=0.0,
    )
    BaseModel.save_network(model, net, "net_g", -1)
    BaseModel.save_training_state(model, 0, 3)
    state = torch.load(tmp_path / "training_states" / "3.state", weights_only=False)
    assert state["iter"] == 3 and set(state["rng_states"]) >= {"python", "numpy", "torch"}
    before = (tmp_path / "models" / "net_g_latest.pth").read_bytes()

    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(1)
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match=r"cannot save .*net_g_latest\.pth after 3 attempts"):
        BaseModel.save_network(model, net, "net_g", -1)
    with pytest.raises(OSError, match=r"cannot save .*4\.state"):
        BaseModel.save_training_state(model, 0, 4)
    assert len(calls) == 6
    assert (tmp_path / "models" / "net_g_latest.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["3.state", "net_g_latest.pth"]
