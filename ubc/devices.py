"""What this machine offers: devices (asking the NVIDIA driver itself, never a framework: an
ONNX Runtime service must not load torch to learn there is no GPU, and a TensorRT-only
deployment has only tensorrt + cuda-bindings + numpy), the GPU's name and compute
capability, the CPU's vector instruction set (for AOTInductor packages), and its class and
native reduced precisions (bf16, int8 dot products) read from the CPU flags at run time:
users have AMX Xeons and AVX2-only EPYCs, nothing may assume either."""

from __future__ import annotations

import importlib.util
import os
import platform
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ubc.artifacts import GpuInfo

DEVICES = ("auto", "cpu", "cuda")


#: import names of the packages whose pip name is not their import name
_IMPORT_NAMES = {"cuda-bindings": "cuda"}


def missing(packages: Sequence[str], install: str) -> str | None:
    """Why ``packages`` (pip names) cannot all be imported here, naming the first one that
    is not installed and the command ``install`` that installs it; None when all are."""
    for package in packages:
        if importlib.util.find_spec(_IMPORT_NAMES.get(package, package)) is None:
            return f"{package} is not installed ({install})"
    return None


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` -> ("cpu", 0), ``"cuda:1"`` -> ("cuda", 1); ValueError otherwise."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or \
            (kind == "cpu" and index):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return kind, int(index or 0)


def _runtime_device_count() -> int | None:
    """GPUs seen by the CUDA runtime through cuda-bindings; None if it is not installed."""
    if importlib.util.find_spec("cuda") is None:
        return None
    try:
        from cuda.bindings import runtime
    except ImportError:
        return None
    err, count = runtime.cudaGetDeviceCount()
    return int(count) if err == runtime.cudaError_t.cudaSuccess else 0


#: the NVIDIA driver's library (Linux, Windows), which every CUDA framework loads
_DRIVER_LIBRARIES = ("libcuda.so.1", "nvcuda.dll")


@lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of usable CUDA GPUs (0 on a machine without a GPU or driver), as the driver
    API counts them (``cuDeviceGetCount``, which honours ``CUDA_VISIBLE_DEVICES``): asked
    through ctypes, so that no framework (torch, a CUDA runtime) is imported to learn it."""
    import ctypes

    for name in _DRIVER_LIBRARIES:
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0  # a driver without a usable GPU (or too old for any)
        return int(count.value)
    return 0


def resolve_device(device: str, kinds: Sequence[str] = ("cpu", "cuda")) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is usable and ``kinds`` (the device kinds of the
    backend that will run, e.g. an engine class's ``devices``) include it, else ``"cpu"``;
    checks the others. A CPU-only backend's "auto" asks no driver at all."""
    if device == "auto":
        return "cuda" if "cuda" in kinds and cuda_device_count() > 0 else "cpu"
    kind, index = parse_device(device)
    if kind == "cuda" and index >= cuda_device_count():
        found = cuda_device_count()
        raise ValueError(f"device {device!r} is not available: this machine has {found} usable "
                         "CUDA GPU(s); use device='cpu' or 'auto'")
    return device


def strict_fp32(torch: object) -> None:
    """Make CUDA fp32 mean fp32: PyTorch lets cuDNN convolutions use TF32 by default (10-bit
    mantissa on Ampere and newer), which breaks the fp32 parity bound of 1e-3. Process-wide;
    fp16/bf16 engines are the fast path instead."""
    backends = torch.backends  # type: ignore[attr-defined]
    backends.cudnn.allow_tf32 = False
    backends.cuda.matmul.allow_tf32 = False


def gpu_info(index: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``index`` (which must exist)."""
    if _runtime_device_count():
        from cuda.bindings import runtime

        err, prop = runtime.cudaGetDeviceProperties(index)
        if err == runtime.cudaError_t.cudaSuccess:
            raw = prop.name
            name = raw.split(b"\0", 1)[0].decode() if isinstance(raw, bytes) else str(raw)
            return GpuInfo(name=name, major=int(prop.major), minor=int(prop.minor))
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return GpuInfo(name=torch.cuda.get_device_name(index), major=major, minor=minor)


# x86 vector sets, each a superset of the ones before it.
_X86_ISA_RANK = {"none": 0, "avx2": 1, "avx512": 2, "amx": 3}


def cpu_isa() -> str:
    """The vector instruction set Inductor compiles for on this CPU: avx2, avx512, amx, ..."""
    from ubc.quiet import ignoring_log

    # importing it imports torch's C++-extension module, which logs "No CUDA runtime is
    # found" on every CPU-only machine that has a CUDA_HOME
    with ignoring_log("torch.utils.cpp_extension", "No CUDA runtime is found"):
        from torch._inductor import cpu_vec_isa
    isa = cpu_vec_isa.pick_vec_isa()
    if not isa:
        return "none"
    return type(isa).__name__.lower().removeprefix("vec")


def torch_series(version: str) -> str:
    """``2.14.1+cu130`` -> ``2.14``: AOTInductor packages are tied to a PyTorch release."""
    return ".".join(version.split("+")[0].split(".")[:2])


def isa_rank(isa: str) -> int:
    """Position of an x86 vector set in ``_X86_ISA_RANK`` (-1 when unknown)."""
    return _X86_ISA_RANK.get(isa, -1)


def isa_compatible(built: str, here: str) -> bool:
    """Whether machine code built for vector set ``built`` runs on a CPU with ``here``."""
    if built == here:
        return True
    return built in _X86_ISA_RANK and here in _X86_ISA_RANK and \
        _X86_ISA_RANK[here] >= _X86_ISA_RANK[built]


#: The instruction-set cap that oneDNN (PyTorch's and OpenVINO's convolutions) honours; ubc
#: honours it too, so that a run capped at AVX2 on an AMX Xeon (``ubc-bench --max-isa avx2``)
#: is filed and reported as an AVX2 machine.
ISA_CAP_ENV = "ONEDNN_MAX_CPU_ISA"
_AMX = frozenset({"amx_tile", "amx_int8", "amx_bf16", "amx_fp16"})
_AVX512 = frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16"})


class IsaCap(NamedTuple):
    """What one ``ONEDNN_MAX_CPU_ISA`` cap means: the CPU flags of the instruction sets above
    it, and the ATen kernel set (``ATEN_CPU_CAPABILITY``) PyTorch should use under it."""

    above: frozenset[str]
    aten: str


#: The caps ubc knows, by oneDNN's names (``ubc-bench --max-isa``).
ISA_CAPS = {
    "avx2": IsaCap(_AMX | _AVX512 | {"avx_vnni"}, "avx2"),
    "avx2_vnni": IsaCap(_AMX | _AVX512, "avx2"),
    "avx512_core": IsaCap(_AMX | {"avx512_vnni", "avx512_bf16", "avx512_fp16"}, "avx512"),
    "avx512_core_vnni": IsaCap(_AMX | {"avx512_bf16", "avx512_fp16"}, "avx512"),
    "avx512_core_bf16": IsaCap(_AMX | {"avx512_fp16"}, "avx512"),
}


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (``/proc/cpuinfo``; empty elsewhere), less
    those above the ``ONEDNN_MAX_CPU_ISA`` cap when one is set."""
    cap = os.environ.get(ISA_CAP_ENV, "").lower()
    return _proc_flags() - (ISA_CAPS[cap].above if cap in ISA_CAPS else frozenset())


@lru_cache(maxsize=1)
def _proc_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_model() -> str:
    """The CPU's marketing name (``model name`` of /proc/cpuinfo), or the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Fastest first: the first class whose flags are all present names the CPU.
_CPU_CLASSES = (("amx", {"amx_tile", "amx_int8", "amx_bf16"}),
                ("avx512-vnni", {"avx512f", "avx512_vnni"}), ("avx512", {"avx512f"}),
                ("avx2-vnni", {"avx2", "avx_vnni"}), ("avx2", {"avx2"}))


def cpu_class(flags: frozenset[str] | None = None) -> str:
    """The class of this CPU that recorded timings are filed under: amx, avx512-vnni,
    avx512, avx2-vnni, avx2, else the machine name (x86_64 without AVX2, aarch64, ...).
    Speeds of int8 and bf16 differ by an order of magnitude between these classes."""
    flags = cpu_flags() if flags is None else flags
    for name, needed in _CPU_CLASSES:
        if needed <= flags:
            return name
    return platform.machine().lower() or "unknown"


def native_bf16(flags: frozenset[str] | None = None) -> bool | None:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16): True/False from the
    flags, None where the flags are unknown (not Linux: ask the runtime instead)."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & flags)
