"""Facts about the machine a benchmark ran on: CPU model, the vector flags the runtimes'
kernels depend on, cores, memory, GPU and driver, library versions, and how busy the machine
was (load average).

Cores, memory and load come from psutil; the OS and Python from ``platform``; the CPU model,
flags and class (what recorded timings are filed under) from ``ubc.devices``, which reads
them from /proc/cpuinfo (psutil has neither), as does the GPU. Versions come from package
metadata, so nothing heavy is imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError as exc:  # pragma: no cover - a [bench] dependency
    raise ImportError("ubc-bench needs psutil (pip install 'ubc[bench]')") from exc

#: vector and matrix instruction sets that decide which CPU kernels the runtimes use
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
LIBRARIES = ("ubc", "numpy", "torch", "segmentation-models-pytorch", "onnx", "onnxruntime",
             "openvino", "tensorrt", "cuda-bindings", "nibabel", "monai", "isal", "psutil")
#: assumed when the OS does not say (sysfs): the rotation then holds 64 MiB of inputs
DEFAULT_CACHE_BYTES = 32 << 20


def last_level_cache_bytes() -> int:
    """Size of the largest cache cpu0 reports (sysfs, e.g. ``32768K``); a default elsewhere."""
    sizes = [int(p.read_text().strip().rstrip("K")) << 10 for p in
             Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
    return max(sizes, default=0) or DEFAULT_CACHE_BYTES


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(psutil.Process().cpu_affinity() or ()) or psutil.cpu_count() or 1
    except (AttributeError, psutil.Error):  # macOS has no affinity
        return psutil.cpu_count() or 1


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (runnable processes)."""
    return [round(x, 2) for x in psutil.getloadavg()]


def _gpus() -> list[dict[str, Any]]:
    """Name, compute capability and memory of each usable CUDA GPU (empty without one)."""
    from ubc.devices import cuda_device_count, gpu_info

    gpus = []
    for index in range(cuda_device_count()):
        info = gpu_info(index)
        entry: dict[str, Any] = {"index": index, "name": info.name,
                                 "compute_capability": f"{info.major}.{info.minor}"}
        try:
            import torch

            entry["memory_gib"] = round(
                torch.cuda.get_device_properties(index).total_memory / (1 << 30), 1)
            entry["cuda_runtime"] = torch.version.cuda
        except (ImportError, RuntimeError):
            pass
        gpus.append(entry)
    return gpus


def _driver() -> str | None:
    """The NVIDIA kernel driver's version line, from /proc (None without a driver)."""
    try:
        line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return next((w for w in line.split() if w[:1].isdigit() and "." in w), line.strip())


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict[str, Any]:
    """Everything above, as one JSON-ready dictionary. ``hostname_hash`` tells runs on
    different machines apart without publishing the host name."""
    from ubc.devices import cpu_class, cpu_flags, cpu_model

    gpus = _gpus()
    return {
        "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:8],
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": {"model": cpu_model(), "arch": platform.machine(), "class": cpu_class(),
                "flags": [f for f in CPU_FLAGS if f in cpu_flags()],
                "physical_cores": psutil.cpu_count(logical=False),
                "logical_cores": psutil.cpu_count(), "usable_cores": usable_cores(),
                "last_level_cache_mib": round(last_level_cache_bytes() / (1 << 20), 1)},
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "gpus": gpus,
        "driver": _driver() if gpus else None,
        "libraries": {name: _version(name) for name in LIBRARIES},
        "load_average": load_average(),
    }


def describe(facts: dict[str, Any]) -> str:
    """One line: CPU model and cores, the GPU and driver, and the load average."""
    cpu = facts["cpu"]
    text = f"{cpu['model']} ({cpu.get('class', '?')}), {cpu['usable_cores']} usable cores"
    if facts["gpus"]:
        gpu = facts["gpus"][0]
        text += f"; GPU {gpu['name']} (sm {gpu['compute_capability']}, driver " \
                f"{facts['driver'] or '?'})"
    if facts["load_average"]:
        text += f"; load average {' '.join(f'{x:.2f}' for x in facts['load_average'])}"
    return text


__all__ = ["CPU_FLAGS", "describe", "last_level_cache_bytes", "load_average",
           "machine_facts", "usable_cores"]
