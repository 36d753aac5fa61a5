"""TensorRT plans built from the bundle's ONNX with the TensorRT 10 Python API.

Explicit batch; one optimisation profile (min 1, opt and max from the arguments); FP16;
INT8 with an entropy calibrator fed by preprocessed slices (its cache is kept in the bundle
as ``calib.int8.cache`` and reused when no new slices are given); a timing cache per GPU and
TensorRT version kept in the bundle. The plan is stored under a name carrying the GPU
model, compute capability, TensorRT version and precision (``ubc.artifacts``).

TensorRT 11 removed the weak-typing flags (BuilderFlag.FP16/INT8) and the INT8 calibrators;
with it only fp32 plans are built here, and fp16/int8 ask for TensorRT 10 (see
``_check_precision``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ubc import cuda_memory
from ubc.artifacts import (
    CALIB_CACHE,
    INPUT_NAME,
    ONNX,
    PLAN_PRECISIONS,
    GpuInfo,
    artifacts_of,
    plan_name,
    stale_reason,
    timing_cache_name,
    with_artifact,
)
from ubc.bundle import Bundle, artifact_metadata_mismatch
from ubc.devices import gpu_info, parse_device, resolve_device
from ubc.export.common import CalibrationBatches, ExportResult, artifact_entry, check_arch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorRTOptions:
    """How a plan is built. Batch sizes are slices per call: the profile covers
    1..``max_batch`` and is tuned for ``opt_batch`` (default: ``max_batch``)."""

    precision: str = "fp16"
    max_batch: int = 32
    opt_batch: int | None = None
    workspace_gib: float = 4.0
    calib_batch: int = 8
    device: str = "cuda"

    def __post_init__(self) -> None:
        if self.precision not in PLAN_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PLAN_PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not 1 <= self.optimal_batch <= self.max_batch:
            raise ValueError(f"opt_batch must be within 1..max_batch={self.max_batch}, "
                             f"got {self.opt_batch}")
        if self.calib_batch < 1 or self.workspace_gib <= 0:
            raise ValueError("calib_batch and workspace_gib must be positive")

    @property
    def optimal_batch(self) -> int:
        return self.max_batch if self.opt_batch is None else self.opt_batch


def _check_precision(trt: Any, precision: str) -> None:
    if precision != "fp32" and not hasattr(trt.BuilderFlag, "FP16"):
        raise RuntimeError(f"TensorRT {trt.__version__} builds strongly typed networks only "
                           "(no FP16/INT8 builder flags, no calibrators); build fp16/int8 "
                           "plans with TensorRT 10: pip install 'tensorrt>=10,<11'")


def _calibrator(trt: Any, batches: CalibrationBatches | None, cache: bytes | None) -> Any:
    """An IInt8EntropyCalibrator2 feeding ``batches`` through one device buffer, or
    replaying ``cache`` (a previous calibration of the same weights)."""
    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.cache = cache
            self.batch = batches.batch if batches is not None else 1
            self._iter = iter(batches) if batches is not None else iter(())
            self._host: Any = None
            self._device: Any = None
            self._stream = cuda_memory.Stream()

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._iter, None)
            if batch is None:
                return None
            if self._device is None:
                self._host = cuda_memory.PinnedArray(batch.shape, np.float32)
                self._device = cuda_memory.DeviceBuffer(batch.nbytes)
            np.copyto(self._host.array, batch)
            cuda_memory.copy_to_device(self._device, self._host, batch.nbytes, self._stream)
            self._stream.synchronize()
            return [self._device.ptr]

        def read_calibration_cache(self) -> bytes | None:
            return self.cache

        def write_calibration_cache(self, data: Any) -> None:
            self.cache = bytes(data)

        def release(self) -> None:
            for resource in (self._host, self._device, self._stream):
                if resource is not None:
                    resource.close()

    return Calibrator()


def _parse_onnx(trt: Any, builder: Any, logger: Any, bundle: Bundle) -> Any:
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    path = bundle.file(ONNX)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{path}: TensorRT cannot parse it ({errors}); re-export it with "
                           f"`ubc-export {bundle.path} --onnx`")
    return network, parser


def _onnx_settings(bundle: Bundle) -> dict[str, str]:
    """The ``ubc.*`` metadata of the bundle's ONNX, checked against meta.json: a plan has
    no metadata of its own, so its meta.json record keeps its source's (the engine compares
    that record with meta.json). Read by ONNX Runtime, which every install has."""
    import onnxruntime as ort

    path = bundle.file(ONNX)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    embedded = dict(session.get_modelmeta().custom_metadata_map)
    mismatch = artifact_metadata_mismatch(bundle.meta, embedded)
    if mismatch is not None:
        raise ValueError(f"{path}: {mismatch}; restore meta.json, or re-export the ONNX "
                         f"(`ubc-export {bundle.path} --onnx`) before building a plan")
    return {k: v for k, v in embedded.items() if k.startswith("ubc.")}


def _profile(builder: Any, size: tuple[int, int], low: int, opt: int, high: int) -> Any:
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (low, 1, *size), (opt, 1, *size), (high, 1, *size))
    return profile


def _timing_cache(config: Any, bundle: Bundle, name: str) -> Any:
    """Attach the bundle's timing cache ``name`` to ``config`` (a fresh one when there is
    none, or when TensorRT refuses it: ``set_timing_cache`` returns False for a cache
    made on another device or TensorRT build, and a config left without one fails later, at
    ``get_timing_cache().serialize()``, after the build, before the plan is written)."""
    previous = bundle.file(name).read_bytes() if bundle.has(name) else b""
    cache = config.create_timing_cache(previous)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if not previous:
        raise RuntimeError("TensorRT refused a new, empty timing cache")
    log.warning("%s: TensorRT refused the timing cache %s (made on another device or "
                "TensorRT build); timing from scratch", bundle.path, name)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError("TensorRT refused a new, empty timing cache")
    return cache


def _build(trt: Any, bundle: Bundle, options: TensorRTOptions, gpu: GpuInfo,
           calib: np.ndarray | None) -> tuple[bytes, bytes, bytes | None]:
    """(plan, timing cache, calibration cache) built from the bundle's ONNX."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse_onnx(trt, builder, logger, bundle)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE,
                                 int(options.workspace_gib * (1 << 30)))
    size = bundle.preprocessing.size
    config.add_optimization_profile(_profile(builder, size, 1, options.optimal_batch,
                                             options.max_batch))
    _timing_cache(config, bundle, timing_cache_name(gpu, trt.__version__))
    calibrator = None
    if options.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 plans stay fp32
    if options.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 falls back to FP16, not FP32
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        batches = None if calib is None else CalibrationBatches(calib, options.calib_batch, size)
        cache = None
        if batches is None:
            if not bundle.has(CALIB_CACHE):
                raise ValueError(f"{bundle.path}: INT8 needs calibration slices (--calib DATA) "
                                 f"or a {CALIB_CACHE} from an earlier calibration")
            stale = stale_reason(bundle, CALIB_CACHE)
            if stale is not None:
                raise ValueError(f"{bundle.path}: {stale.split(';')[0]}; calibrate again "
                                 "with --calib DATA")
            cache = bundle.file(CALIB_CACHE).read_bytes()
        calibrator = _calibrator(trt, batches, cache)
        config.int8_calibrator = calibrator
        batch = calibrator.get_batch_size()
        config.set_calibration_profile(_profile(builder, size, batch, batch, batch))
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.release()
    if plan is None:
        raise RuntimeError(f"{bundle.path}: TensorRT could not build the {options.precision} "
                           "plan (its log above says why)")
    timing = bytes(config.get_timing_cache().serialize())
    return bytes(plan), timing, calibrator.cache if calibrator is not None else None


def to_tensorrt(bundle: Bundle, *, options: TensorRTOptions | None = None,
                calib: np.ndarray | None = None) -> ExportResult:
    """Build a TensorRT plan for this machine's GPU from the bundle's ``model.onnx`` and
    store it (and the timing and calibration caches) in the bundle atomically.
    ``calib``: preprocessed slices float32 [N, 1, H, W] for INT8 (a few hundred is plenty;
    see ``ubc.data.sample_slices``)."""
    options = options or TensorRTOptions()
    check_arch(bundle)
    import tensorrt as trt

    _check_precision(trt, options.precision)
    if not bundle.has(ONNX):
        raise ValueError(f"{bundle.path}: a plan is built from model.onnx; export it first: "
                         f"`ubc-export {bundle.path} --onnx`")
    device = resolve_device(options.device)
    if not device.startswith("cuda"):
        raise ValueError("TensorRT plans are built on the GPU that runs them; none is usable "
                         "here")
    index = parse_device(device)[1]
    settings = _onnx_settings(bundle)
    cuda_memory.set_device(index)
    gpu = gpu_info(index)
    start = time.perf_counter()
    plan, timing, calib_cache = _build(trt, bundle, options, gpu, calib)
    seconds = time.perf_counter() - start
    base = {"gpu": gpu.name, "compute_capability": f"{gpu.major}{gpu.minor}",
            "tensorrt": trt.__version__}
    cache_name = timing_cache_name(gpu, trt.__version__)
    bundle.write_file(cache_name, lambda tmp: tmp.write_bytes(timing),
                      artifacts=with_artifact(bundle.meta, cache_name,
                                              **artifact_entry(bundle, "timing-cache", **base)))
    if calib_cache is not None and calib is not None:
        bundle.write_file(CALIB_CACHE, lambda tmp: tmp.write_bytes(calib_cache),
                          artifacts=with_artifact(bundle.meta, CALIB_CACHE, **artifact_entry(
                              bundle, "int8-calibration", slices=int(len(calib)),
                              tensorrt=trt.__version__)))
    name = plan_name(gpu, trt.__version__, options.precision)
    entry = artifact_entry(bundle, "tensorrt", precision=options.precision, min_batch=1,
                           opt_batch=options.optimal_batch, max_batch=options.max_batch,
                           build_seconds=round(seconds, 1), **base,
                           onnx_sha256=bundle.meta["files"][ONNX], metadata=settings,
                           calibration=(artifacts_of(bundle.meta).get(CALIB_CACHE, {})
                                        if options.precision == "int8" else None))
    path = bundle.write_file(name, lambda tmp: tmp.write_bytes(plan),
                             artifacts=with_artifact(bundle.meta, name, **entry))
    return ExportResult(name, path, seconds, entry)
