"""Facts about the machine a benchmark ran on: CPU model, vector flags, cores, cache and
memory, GPU and driver, library versions, and how busy the machine was (load average).

Nothing heavy is imported: versions come from package metadata, the GPU from the NVIDIA
driver's /proc entry, cuda-bindings or torch, whichever is present.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import Any

#: vector and matrix instruction sets that decide which CPU kernels the runtimes use
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
             "asimd", "sve", "sve2")
LIBRARIES = ("ubc", "numpy", "torch", "segmentation-models-pytorch", "onnx", "onnxruntime",
             "openvino", "tensorrt", "cuda-bindings", "nibabel", "monai", "isal")
DEFAULT_CACHE_BYTES = 32 << 20


def _cpuinfo() -> dict[str, str]:
    """The first processor's entry of /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    entry: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        entry[key.strip()] = value.strip()
    return entry


def _size_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)B?", text.strip(), re.IGNORECASE)
    if not match:
        return 0
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2).upper()]


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache cpu0 reports (bytes); ``DEFAULT_CACHE_BYTES`` if none."""
    sizes = [_size_bytes(p.read_text()) for p in
             Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size") if p.is_file()]
    return max(sizes, default=0) or DEFAULT_CACHE_BYTES


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_facts() -> dict[str, Any]:
    info = _cpuinfo()
    flags = set(info.get("flags", info.get("Features", "")).split())
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "last_level_cache_mib": round(last_level_cache_bytes() / (1 << 20), 1),
    }


def memory_gib() -> float | None:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    except OSError:
        return None
    return round(int(match.group(1)) / (1 << 20), 1) if match else None


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version, from /proc (None without a driver)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
    return match.group(1) if match else text.splitlines()[0].strip()


def gpu_facts() -> list[dict[str, Any]]:
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
        except (ImportError, RuntimeError):
            pass
        gpus.append(entry)
    return gpus


def library_versions() -> dict[str, str | None]:
    """Installed version of each library a backend or the preprocessing uses (None: absent)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (runnable processes); empty where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_facts() -> dict[str, Any]:
    """Everything above, as one JSON-ready dictionary."""
    gpus = gpu_facts()
    cuda_runtime = None
    if gpus:
        try:
            import torch

            cuda_runtime = torch.version.cuda
        except ImportError:
            pass
    return {
        "hostname_hash": _host_tag(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_facts(),
        "memory_gib": memory_gib(),
        "gpus": gpus,
        "driver": driver_version(),
        "cuda_runtime": cuda_runtime,
        "libraries": library_versions(),
        "load_average": load_average(),
    }


def _host_tag() -> str:
    """A short stable tag of the host (to tell runs on different machines apart) that does
    not publish the host name itself."""
    import hashlib

    return hashlib.sha256(platform.node().encode()).hexdigest()[:8]


def describe(facts: dict[str, Any]) -> str:
    """One line: CPU model and cores, or the GPU and driver, plus the load average."""
    cpu = facts["cpu"]
    text = f"{cpu['model']}, {cpu['usable_cores']} usable cores"
    if facts["gpus"]:
        gpu = facts["gpus"][0]
        text += f"; GPU {gpu['name']} (sm {gpu['compute_capability']}, driver " \
                f"{facts['driver'] or '?'})"
    if facts["load_average"]:
        text += f"; load average {' '.join(f'{x:.2f}' for x in facts['load_average'])}"
    return text
