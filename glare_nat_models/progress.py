"""Progress inside one long network call (a large photo on a CPU takes minutes in a single forward pass).

:class:`LayerProgress` counts the calls of the networks' parameter-owning layers (convolutions, norms, linear
layers, deformable convolutions) through forward hooks and shows them on a tqdm bar with elapsed time and, from
the second call on, the total the first call needed and an estimate of the time left. A heartbeat thread redraws
the bar every ``heartbeat`` seconds, so the elapsed time moves even inside one long operation (a full-resolution
attention block of the official network at 2000x1500 is a single call of minutes). The networks know nothing of
it: the hooks are added around a call and removed after it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

from torch import nn

__all__ = ["LayerProgress", "model_networks"]


def model_networks(model: object) -> list[nn.Module]:
    """The networks (``net_*`` attributes) of a BasicSR model, or ``[model]`` for a bare module."""
    if isinstance(model, nn.Module):
        return [model]
    return [v for k, v in vars(model).items() if k.startswith("net_") and isinstance(v, nn.Module)]


class LayerProgress:
    """A progress bar advanced by every layer call of ``nets`` inside :meth:`track`.

    Args:
        nets: the networks to watch; their modules that own parameters directly are hooked.
        desc: bar label.
        enabled: False makes :meth:`track` a no-op.
        mininterval: seconds between bar refreshes (tqdm's throttle; the bar prints on the first call after it).
        heartbeat: seconds between redraws by the heartbeat thread (elapsed time keeps moving inside a long layer).
    """

    def __init__(
        self,
        nets: Iterable[nn.Module],
        desc: str = "layers",
        enabled: bool = True,
        mininterval: float = 2,
        heartbeat: float = 10,
    ) -> None:
        self.layers = [m for net in nets for m in net.modules() if next(m.parameters(recurse=False), None) is not None]
        self.desc, self.enabled, self.mininterval, self.heartbeat = desc, enabled, mininterval, heartbeat
        self.total: int | None = None  # layer calls of the previous tracked call

    @contextlib.contextmanager
    def track(self, label: str = "") -> Iterator[None]:
        """Hook the layers for the duration of the block; the bar closes (and the hooks go) when it ends."""
        if not self.enabled or not self.layers:
            yield
            return
        from tqdm import tqdm

        bar = tqdm(
            total=self.total,
            desc=f"{self.desc} {label}".strip(),
            unit="layer",
            mininterval=self.mininterval,
            leave=False,
        )

        def advance(*_) -> None:  # a forward hook must return None (anything else replaces the output)
            bar.update(1)

        hooks = [m.register_forward_hook(advance) for m in self.layers]
        stop = threading.Event()

        def beat() -> None:  # torch ops release the GIL, so this runs during a long convolution or attention call
            while not stop.wait(self.heartbeat):
                bar.refresh()

        thread = threading.Thread(target=beat, name="glare-nat-progress", daemon=True)
        thread.start()
        try:
            yield
            self.total = bar.n
        finally:
            stop.set()
            thread.join()
            for h in hooks:
                h.remove()
            bar.close()
