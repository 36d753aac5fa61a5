"""Peak memory of a measurement: host resident set (this process) and device memory.

Host: Linux keeps the process's peak resident set (``VmHWM`` in /proc/self/status) and lets
a process reset it by writing ``5`` to /proc/self/clear_refs, so each measurement gets its
own peak. Where that is not possible (another OS, a locked-down /proc), the peak since the
process started (``getrusage``) is reported and ``host_peak_is_lifetime`` says so.

Device: the most the torch caching allocator reserved (torch backends), or the growth of
the GPU's used memory seen by ``cudaMemGetInfo`` since the engine was loaded (TensorRT,
whose buffers do not go through torch), whichever is larger.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = float(1 << 20)


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_mib() -> float:
    """This process's resident set now (MiB); NaN where /proc is unavailable."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def reset_host_peak() -> bool:
    """Start a new peak-RSS window; False when the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def host_peak_mib() -> float:
    """Peak resident set (MiB) since the last ``reset_host_peak`` (or process start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


class DeviceMemory:
    """Peak device memory (MiB) of one CUDA device over a window (see the module doc)."""

    def __init__(self, device: str) -> None:
        from ubc.devices import parse_device

        self.index = parse_device(device)[1]
        self._torch = None
        try:
            import torch

            if torch.cuda.is_available():
                self._torch = torch
        except ImportError:
            pass
        self.baseline = self._used()

    def _used(self) -> float:
        if self._torch is not None:
            free, total = self._torch.cuda.mem_get_info(self.index)
        else:
            from cuda.bindings import runtime

            from ubc.engine.cuda_memory import check

            free, total = check("cudaMemGetInfo", runtime.cudaMemGetInfo())
        return (int(total) - int(free)) / MIB

    def reset(self) -> None:
        """Start a new peak window (torch's peak counters; the used-memory baseline stays
        the one taken before the engine was loaded)."""
        if self._torch is not None:
            self._torch.cuda.reset_peak_memory_stats(self.index)

    def peak_mib(self) -> float:
        """Device memory the engine holds at its peak in this window (MiB)."""
        grown = self._used() - self.baseline
        if self._torch is not None:
            grown = max(grown, self._torch.cuda.max_memory_reserved(self.index) / MIB)
        return max(grown, 0.0)
