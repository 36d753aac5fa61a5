"""Names and descriptions of the artifacts a bundle holds, shared by ``ubc.export`` (which
writes them) and ``ubc.engine`` (which picks and loads them): file names, plan naming,
staleness against the weights, and the keys of parity records.

Every exported file has an entry in ``meta["artifacts"]`` (format, device, precision, the
versions it was built with) beside its sha256 in ``meta["files"]``. Machine-specific
artifacts carry the machine in their name, so that several can live in one bundle:

- ``weights.pt``                              eager state dict (the reference)
- ``model.ts``                                TorchScript, device-neutral
- ``model.onnx``                              ONNX, dynamic batch; source of every plan
- ``model.cpu-avx512.pt2``, ``model.cuda-sm90.pt2``  AOTInductor packages (per CPU vector
  instruction set or GPU arch, and PyTorch release)
- ``model.<gpu>.sm90.trt10.8.0.fp16.plan``     TensorRT plans (per GPU, TensorRT, precision)
- ``model.int8.onnx``                         INT8 QDQ ONNX (ONNX Runtime's static quantiser)
- ``model.int8.xml`` + ``model.int8.bin``     INT8 OpenVINO IR (NNCF post-training quantisation)

Timings of the CPU variants, measured at export on one CPU class (``ubc.devices.cpu_class``),
are kept in ``meta["timing"][<cpu class>][<variant>:<precision>]`` for ``backend="auto"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from ubc.bundle import Bundle

WEIGHTS = "weights.pt"
TORCHSCRIPT = "model.ts"
#: the extra file in model.ts holding the settings it was exported with (JSON)
TORCHSCRIPT_META = "ubc_meta.json"
ONNX = "model.onnx"
CALIB_CACHE = "calib.int8.cache"
INT8_ONNX = "model.int8.onnx"
INT8_OPENVINO = "model.int8.xml"
INT8_OPENVINO_WEIGHTS = "model.int8.bin"

#: every precision an engine may offer; each backend class declares its own subset
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: the precisions TensorRT plans are built at
PLAN_PRECISIONS = ("fp32", "fp16", "int8")

INPUT_NAME = "image"
OUTPUT_NAMES = ("class_logits", "mask_logits")
#: (class logits [N, 2], mask logits [N, 1, H, W]) of one engine on one set of slices
Outputs = tuple["np.ndarray", "np.ndarray"]

_PLAN = re.compile(r"^model\.(?P<gpu>[a-z0-9-]+)\.sm(?P<cc>\d+)\.trt(?P<trt>[0-9.]+)"
                   r"\.(?P<precision>" + "|".join(PLAN_PRECISIONS) + r")\.plan$")


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an artifact is built for: marketing name and compute capability."""

    name: str
    major: int
    minor: int

    @property
    def slug(self) -> str:
        """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (safe in a file name)."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"

    @property
    def sm(self) -> str:
        return f"sm{self.major}{self.minor}"


def plan_name(gpu: GpuInfo, trt_version: str, precision: str) -> str:
    """File name of a TensorRT plan built on ``gpu`` with TensorRT ``trt_version``."""
    return f"model.{gpu.slug}.{gpu.sm}.trt{trt_version}.{precision}.plan"


def parse_plan_name(name: str) -> dict[str, str] | None:
    """``{"gpu", "cc", "trt", "precision"}`` of a plan file name, None if it is not one."""
    match = _PLAN.match(name)
    return match.groupdict() if match else None


def timing_cache_name(gpu: GpuInfo, trt_version: str) -> str:
    return f"timing.{gpu.slug}.{gpu.sm}.trt{trt_version}.cache"


def aoti_name(device: str, *, isa: str = "", gpu: GpuInfo | None = None) -> str:
    """``model.cpu-avx512.pt2`` (machine code for one vector instruction set), or
    ``model.cuda-sm90.pt2`` (kernels for one compute capability)."""
    if device == "cpu":
        return f"model.cpu-{isa or 'none'}.pt2"
    if gpu is None:
        raise ValueError("a CUDA AOTInductor package needs the GPU it is compiled for")
    return f"model.cuda-{gpu.sm}.pt2"


def artifacts_of(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``meta["artifacts"]``: file name -> description (format, device, precision, ...)."""
    entries = meta.get("artifacts", {})
    return entries if isinstance(entries, dict) else {}


def with_artifact(meta: dict[str, Any], name: str, **description: Any) -> dict[str, Any]:
    """A copy of ``meta["artifacts"]`` with ``name`` described (for ``Bundle.write_file``)."""
    entries = dict(artifacts_of(meta))
    entries[name] = description
    return entries


@dataclass(frozen=True)
class ExportFormat:
    """One export format, declared: what it writes and needs, and how ``ubc-export`` makes it.

    ``exporter``: "module:function", imported on first use. ``files``: regular expression of
    the artifact names it writes, whose named groups fill ``rebuild``, the ``ubc-export``
    arguments that (re)make one of them on this machine. ``help``: the help of its own
    ``ubc-export --NAME`` option ("": only ``--cpu`` makes it). ``inputs``: what it is
    made from, "example" (slices traced) and/or "calib" (INT8 calibration slices), and
    "gate" (the INT8 gates' margin, for choosing the INT8 layer groups). ``packages`` (pip names)
    and ``install``: what it imports beyond the base install. ``cpu``: a step of
    ``ubc-export --cpu``, in the order of ``FORMATS``.
    """

    name: str
    exporter: str
    files: str
    rebuild: str
    help: str = ""
    inputs: tuple[str, ...] = ("example",)
    packages: tuple[str, ...] = ("torch",)
    install: str = "pip install ubc[export]"
    cpu: bool = False


#: Every export format, in the order they are exported (TensorRT plans and the INT8 forms
#: are made from model.onnx).
FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("torchscript", "ubc.export.torchscript:to_torchscript", r"model\.ts",
                 "--torchscript", "traced, frozen model.ts", cpu=True),
    ExportFormat("onnx", "ubc.export.onnx:to_onnx", r"model\.onnx", "--onnx",
                 "model.onnx, dynamic batch", packages=("torch", "onnx"), cpu=True),
    ExportFormat("aoti", "ubc.export.aoti:to_aoti", r"model\.(?P<device>cpu|cuda)-.+\.pt2",
                 "--aoti --device {device}",
                 "AOTInductor package for --device (compiles for minutes)"),
    ExportFormat("tensorrt", "ubc.export.tensorrt:to_tensorrt", _PLAN.pattern,
                 "--tensorrt --precision {precision}",
                 "TensorRT plan for this GPU (exports the ONNX first if needed)",
                 inputs=("calib",), packages=("tensorrt", "cuda-bindings"),
                 install="pip install ubc[tensorrt]"),
    # OpenVINO's INT8 first: ONNX Runtime's reuses the layer choice it measures
    ExportFormat("int8-openvino", "ubc.export.int8_openvino:to_int8_openvino",
                 r"model\.int8\.(xml|bin)", "--cpu --calib DATA", inputs=("calib", "gate"),
                 packages=("nncf", "openvino"), install="pip install ubc[openvino] nncf",
                 cpu=True),
    ExportFormat("int8-onnx", "ubc.export.int8_onnx:to_int8_onnx", r"model\.int8\.onnx",
                 "--cpu --calib DATA", inputs=("calib",), packages=("onnxruntime", "onnx"),
                 cpu=True),
)}


def rebuild_hint(bundle_path: object, name: str) -> str:
    """The one command that rebuilds artifact ``name`` of a bundle on this machine (the
    ``rebuild`` arguments of the format whose ``files`` it matches)."""
    for fmt in FORMATS.values():
        match = re.fullmatch(fmt.files, name)
        if match:
            return f"ubc-export {bundle_path} {fmt.rebuild.format(**match.groupdict())}"
    return f"ubc-export {bundle_path}"


def parity_key(backend: str, device: str, precision: str, artifact: str) -> str:
    """Key of a parity record in ``meta["parity"]``, e.g. ``onnxruntime:cpu:fp32:model.onnx``."""
    return f"{backend}:{device.partition(':')[0]}:{precision}:{artifact}"


def stale_reason(bundle: Bundle, artifact: str) -> str | None:
    """Why ``artifact`` no longer matches the bundle's weights (None when it does)."""
    entry = artifacts_of(bundle.meta).get(artifact, {})
    made_from = entry.get("weights_sha256")
    if made_from is not None and made_from != bundle.meta["files"].get(WEIGHTS):
        return (f"{artifact} was exported from other weights than the bundle's weights.pt; "
                f"rebuild it: `{rebuild_hint(bundle.path, artifact)}`")
    return None


def timing_key(variant: str, precision: str) -> str:
    """Key of a timing record within one CPU class, e.g. ``openvino:int8``."""
    return f"{variant}:{precision}"


def timings_of(meta: dict[str, Any], cpu_class: str) -> dict[str, dict[str, Any]]:
    """``meta["timing"][cpu_class]``: timing key -> record (slices_per_s, batch, threads,
    artifact, sha256, load average, when), empty when none was measured on that class."""
    entries = meta.get("timing", {})
    recorded = entries.get(cpu_class, {}) if isinstance(entries, dict) else {}
    return recorded if isinstance(recorded, dict) else {}


def timed_cpu_classes(meta: dict[str, Any]) -> list[str]:
    """The CPU classes ``meta["timing"]`` holds timings for, sorted."""
    entries = meta.get("timing", {})
    return sorted(c for c in entries if timings_of(meta, c)) if isinstance(entries, dict) \
        else []
