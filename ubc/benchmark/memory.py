"""Memory of a measurement: the host resident set of this process (psutil; its peak from
``getrusage``, which every Unix keeps) and the device memory an engine holds on a GPU.

The host peak is the process's peak since it started: with ``ubc-bench``'s default of one
fresh process per backend, that is the backend's own peak (engine, buffers and runtime).
"""

from __future__ import annotations

import resource
import sys

import psutil

MIB = float(1 << 20)


def rss_mib() -> float:
    """This process's resident set now (MiB)."""
    return psutil.Process().memory_info().rss / MIB


def host_peak_mib() -> float:
    """This process's peak resident set since it started (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
    return peak / MIB if sys.platform == "darwin" else peak / 1024


class DeviceMemory:
    """Peak device memory (MiB) an engine holds on one CUDA device: the most the torch
    caching allocator reserved, or the growth of the device's used memory (``cudaMemGetInfo``)
    since this object was made (TensorRT's buffers bypass torch), whichever is larger."""

    def __init__(self, device: str) -> None:
        import torch

        from ubc.devices import parse_device

        self.index = parse_device(device)[1]
        self._cuda = torch.cuda
        self.baseline = self._used()

    def _used(self) -> float:
        free, total = self._cuda.mem_get_info(self.index)
        return (int(total) - int(free)) / MIB

    def reset(self) -> None:
        """Start a new peak window of torch's counters (the baseline stays)."""
        self._cuda.reset_peak_memory_stats(self.index)

    def peak_mib(self) -> float:
        grown = max(self._used() - self.baseline,
                    self._cuda.max_memory_reserved(self.index) / MIB)
        return max(grown, 0.0)
