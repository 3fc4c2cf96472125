"""Progress inside one network call: layer calls counted through hooks that are gone afterwards."""

from __future__ import annotations

import torch
from torch import nn

from glare_nat_models.progress import LayerProgress, model_networks


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 3, 1))


def test_layer_calls_advance_the_bar_and_the_hooks_are_removed(capsys):
    net = _net()
    progress = LayerProgress([net], desc="network", mininterval=0)
    assert len(progress.layers) == 3  # two convs and the norm own parameters; SiLU does not
    with progress.track("a.png"):
        net(torch.rand(1, 3, 8, 8))
        net(torch.rand(1, 3, 8, 8))
    assert progress.total == 6  # the next call's bar shows x/6 and an estimate of the time left
    assert "network a.png" in capsys.readouterr().err
    assert all(not m._forward_hooks for m in net.modules())
    with progress.track():
        pass
    assert progress.total == 0


def test_disabled_progress_and_model_networks():
    net = _net()
    with LayerProgress([net], enabled=False).track():
        assert all(not m._forward_hooks for m in net.modules())

    class Model:  # a BasicSR model keeps its networks as net_* attributes
        def __init__(self) -> None:
            self.net_g, self.net_vq, self.other = _net(), _net(), _net()

    m = Model()
    assert model_networks(m) == [m.net_g, m.net_vq] and model_networks(net) == [net]


def test_heartbeat_redraws_during_one_long_call(capsys):
    """No layer call for 0.5 s (one long operation): the heartbeat still redraws the bar several times."""
    import time

    progress = LayerProgress([_net()], desc="network", mininterval=0, heartbeat=0.1)
    with progress.track("slow"):
        capsys.readouterr()
        time.sleep(0.55)
        during = capsys.readouterr().err
    assert during.count("network slow") >= 3, during
