"""Local-only loading of the ImageNet feature nets used by LPIPS and the perceptual loss.

Nothing here downloads. A weight file is found, in this order, from

1. the explicit option (``alexnet_weights`` / ``weights_path`` in the YAML), else
2. an environment variable (``GLARE_NAT_ALEXNET`` / ``GLARE_NAT_VGG16``), else
3. torchvision's cache, ``$TORCH_HOME/hub/checkpoints/<torchvision file name>``.

If none exists a :class:`FileNotFoundError` names the expected file and the three ways to supply it.
The literal value ``'random'`` builds the network with random weights (plumbing tests and CPU demos only;
a warning says that the numbers are then not the real LPIPS / perceptual loss).

Files are plain torchvision state dicts (``torchvision.models.alexnet(weights='DEFAULT').state_dict()``
saved with ``torch.save``), i.e. the files torchvision itself caches.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from basicsr.utils import get_root_logger
from torch import nn

from glare_nat_models.checkpoint import read_checkpoint

__all__ = [
    "ALEXNET_FILE",
    "VGG16_FILE",
    "RANDOM",
    "build_lpips",
    "resolve_weights",
    "load_torchvision_state_dict",
    "build_lpips_alex",
    "build_vgg16_features",
]

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
VGG16_FILE = "vgg16-397923af.pth"
RANDOM = "random"

# torchvision vgg16 ``features`` layout up to relu3_3 (indices 0..15): conv widths, 'M' = 2x2 max-pool.
_VGG16_CFG_RELU3_3 = (64, 64, "M", 128, 128, "M", 256, 256, 256)


def resolve_weights(option: str | os.PathLike | None, env_var: str, filename: str, purpose: str) -> Path | None:
    """Find a local torchvision weight file; ``None`` means random weights were requested explicitly.

    Args:
        option: value from the options file (a path, ``'random'`` or ``None``).
        env_var: environment variable consulted when ``option`` is ``None``.
        filename: torchvision's cache file name, looked up in ``torch.hub.get_dir()/checkpoints``.
        purpose: human-readable use (e.g. ``'LPIPS (AlexNet)'``) for messages.

    Raises:
        FileNotFoundError: the given path does not exist, or no file was found anywhere.
    """
    if option is None:
        option = os.environ.get(env_var) or None
        source = f"environment variable {env_var}"
    else:
        source = "option"
    if isinstance(option, str) and option.lower() == RANDOM:
        get_root_logger().warning(f"{purpose}: RANDOM weights requested; values are NOT the real {purpose}.")
        return None
    if option is not None:
        path = Path(option).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{purpose}: weight file {path} (from {source}) does not exist.")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return cached
    raise FileNotFoundError(
        f"{purpose}: no local weights found (this toolkit never downloads). Expected torchvision's '{filename}'. "
        f"Supply it in one of three ways: the option path, the environment variable {env_var}=/path/{filename}, "
        f"or place it at {cached} ($TORCH_HOME/hub/checkpoints/). Use the value 'random' only for plumbing tests."
    )


def load_torchvision_state_dict(path: Path, required: list[str], purpose: str) -> dict[str, torch.Tensor]:
    """Load a torchvision state dict on CPU and check that every ``required`` key is present.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt (named).
        ValueError: the file is not a state dict or lacks keys (the first missing ones are named).
    """
    state = read_checkpoint(path)
    if not isinstance(state, dict):
        raise ValueError(f"{purpose}: {path} holds a {type(state).__name__}, expected a torchvision state dict.")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(
            f"{purpose}: {path} is not a torchvision state dict of the expected network: "
            f"missing {len(missing)} key(s), e.g. {missing[:4]}."
        )
    return state


def build_lpips_alex(weights: Path | None) -> nn.Module:
    """LPIPS v0.1 with the AlexNet trunk (:func:`build_lpips`)."""
    return build_lpips("alex", weights)


def build_lpips(trunk: str, weights: Path | None) -> nn.Module:
    """Build LPIPS v0.1 with the ``trunk`` (``'alex'`` or ``'vgg'``) filled from a local torchvision file.

    ``lpips.LPIPS(net=trunk, pretrained=True, pnet_rand=True)`` gives the package's shipped linear heads
    with a random trunk; the trunk is then filled from ``weights`` (torchvision AlexNet / VGG16 file, key
    ``features.<i>.*`` -> LPIPS key ``slice<k>.<i>.*``). ``weights=None`` keeps the random trunk. The net is frozen
    and in eval mode. Call it as ``net(in0, in1)`` with RGB (N,3,H,W) tensors in [-1, 1]; it returns (N,1,1,1).
    """
    import lpips

    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated ``pretrained=`` argument
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net=trunk, pretrained=True, pnet_rand=True, verbose=False)
    if weights is not None:
        trunk_keys = list(net.net.state_dict().keys())  # e.g. 'slice2.3.weight'
        source = {k: "features." + k.split(".", 1)[1] for k in trunk_keys}
        state = load_torchvision_state_dict(weights, list(source.values()), f"LPIPS ({trunk})")
        net.net.load_state_dict({k: state[v] for k, v in source.items()}, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def build_vgg16_features(weights: Path | None) -> nn.Sequential:
    """torchvision ``vgg16().features[:16]`` (conv1_1 .. relu3_3), loaded from a local torchvision VGG16 file.

    Only the 16 used layers are built (not the 138M-parameter classifier); layer indices equal torchvision's,
    so keys ``features.<i>.*`` with ``i < 16`` load 1:1. ``weights=None`` keeps a random init. Frozen, eval.
    Input (N,3,H,W) -> relu3_3 features (N,256,H/4,W/4).
    """
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG16_CFG_RELU3_3:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = int(v)
    net = nn.Sequential(*layers)
    if weights is not None:
        keys = list(net.state_dict().keys())  # '0.weight', '0.bias', '2.weight', ...
        state = load_torchvision_state_dict(weights, [f"features.{k}" for k in keys], "VGG16 perceptual loss")
        net.load_state_dict({k: state[f"features.{k}"] for k in keys}, strict=True)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
