"""Peak-RSS probing for the memory tests that run a snippet in a fresh process (test_blocks.py, test_deform.py).

:data:`PEAK_RSS_HELPERS` is Python source to prepend to such a snippet. It defines ``peak_extra_mb(fn)``: reset the
kernel's peak-RSS counter (VmHWM, via ``/proc/self/clear_refs``), run ``fn`` under ``torch.no_grad``, and return the
peak RSS above the RSS before the call, in MiB (Linux only).
"""

from __future__ import annotations

import textwrap

PEAK_RSS_HELPERS = textwrap.dedent(
    """
    import torch

    def status_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0

    def peak_extra_mb(fn):
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter VmHWM
            f.write("5")
        base = status_mb("VmRSS")
        with torch.no_grad():
            out = fn()
        peak = status_mb("VmHWM")
        del out
        return peak - base
    """
)
