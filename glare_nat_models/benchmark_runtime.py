"""Runtime columns of ``glare-nat-benchmark``: latency and peak memory of one enhancement call.

What is measured (also in every ``results.json`` as ``protocols.runtime``, see :data:`RUNTIME_DEFINITION`):

* **Latency**: wall time (``time.perf_counter``) of one call of the output function: an input tensor on the CPU
  in, the enhanced tensor out (host-to-device copy, padding, tiles, the model's ``test()``, clamping; image reading,
  metrics and writing are outside). On CUDA, ``torch.cuda.synchronize`` runs before the clock starts and before it
  stops. Per result row, one untimed warm-up call on the row's first image comes first; the row reports the
  **median** over its images.
* **Peak memory**, per call; the row reports the maximum over its images:

  - CUDA: ``torch.cuda.max_memory_allocated`` during the call (the peak counter is reset before it): bytes of all
    live tensors of the process on that device, the weights included. ``mem_increase_mib`` is that peak minus
    ``torch.cuda.memory_allocated`` before the call (what the call itself needed).
  - CPU (Linux): the process's peak resident set size during the call (``VmHWM`` of ``/proc/self/status``, reset
    to the current size before the call by writing ``5`` to ``/proc/self/clear_refs``): interpreter, libraries and
    weights included. ``mem_increase_mib`` is that peak minus ``VmRSS`` before the call; memory the allocator kept
    resident from earlier calls is reused without raising RSS, so the increase can understate what a first call
    needs. Where ``/proc`` cannot be used (not Linux), memory is not measured (``null``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["RUNTIME_DEFINITION", "RuntimeMeter", "rss_status_mib", "reset_peak_rss"]

RUNTIME_DEFINITION = (
    "latency_ms = median over a row's images of the wall time of one enhancement call (CPU tensor in -> output "
    "tensor: host-to-device copy, padding, tiles, model, clamping; reading, metrics and writing excluded), after one "
    "untimed warm-up call on the row's first image; torch.cuda.synchronize before start and stop on CUDA. "
    "peak_mem_mib = maximum over the row's images of the peak memory of one call: on CUDA "
    "torch.cuda.max_memory_allocated (all live tensors on the device, weights included); on CPU the process's peak "
    "resident set size (Linux VmHWM, reset before each call via /proc/self/clear_refs; interpreter, libraries and "
    "weights included). mem_increase_mib = the same peak minus the allocated (CUDA) / resident (CPU) memory just "
    "before the call. The device is named in the record ('device')."
)

_MIB = float(2**20)


def rss_status_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` (any ``kB`` field) of ``/proc/self/status`` in MiB, or None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter ``VmHWM`` to the current RSS (Linux >= 4.0); False where impossible."""
    path = Path("/proc/self/clear_refs")
    try:
        with path.open("w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


class RuntimeMeter:
    """Times calls and records their peak memory on ``device`` (see the module docstring).

    Usage: ``meter.warmup(fn, *args)`` once, then ``out = meter.call(fn, *args)`` per image, then
    :meth:`summary`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.seconds: list[float] = []
        self.peaks: list[float] = []
        self.increases: list[float] = []
        self.memory_measured = True

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def warmup(self, fn: Callable[..., Any], *args: Any) -> None:
        """One untimed call (its result is discarded)."""
        fn(*args)
        self._sync()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, timed, with its peak memory recorded; returns the result."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            ok = reset_peak_rss()
            base = rss_status_mib("VmRSS") if ok else None
        t0 = time.perf_counter()
        out = fn(*args)
        self._sync()
        self.seconds.append(time.perf_counter() - t0)
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / _MIB
            self.peaks.append(peak)
            self.increases.append(peak - base / _MIB)
        else:
            peak = rss_status_mib("VmHWM") if base is not None else None
            if peak is None:
                self.memory_measured = False
            else:
                self.peaks.append(peak)
                self.increases.append(peak - base)
        return out

    def summary(self) -> dict[str, float | int | None]:
        """``latency_ms`` (median), ``peak_mem_mib`` and ``mem_increase_mib`` (maxima; None if not measured),
        ``n_timed``."""
        measured = self.memory_measured and bool(self.peaks)
        return {
            "latency_ms": 1000.0 * statistics.median(self.seconds) if self.seconds else float("nan"),
            "peak_mem_mib": max(self.peaks) if measured else None,
            "mem_increase_mib": max(self.increases) if measured else None,
            "n_timed": len(self.seconds),
        }
