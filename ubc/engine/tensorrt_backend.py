"""TensorRT backend: a serialized plan built for this GPU and TensorRT version.

Needs only tensorrt + cuda-bindings + numpy at run time (no torch, no CUDA toolkit). Input
and outputs live in pinned host buffers and device buffers allocated once for the plan's
largest batch; each call copies in, runs ``execute_async_v3`` and copies out on one stream,
with the batch set per call inside the plan's optimisation profile (TensorRT 10 tensor-
address API). One engine serves one thread at a time.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from ubc import cuda_memory
from ubc.artifacts import (
    INPUT_NAME,
    OUTPUT_NAMES,
    PLAN_PRECISIONS,
    GpuInfo,
    artifacts_of,
    parse_plan_name,
    plan_name,
    rebuild_hint,
)
from ubc.bundle import Bundle
from ubc.devices import gpu_info, parse_device
from ubc.engine.base import Engine
from ubc.errors import BundleError


def tensorrt_version() -> str | None:
    """The installed TensorRT version, None when the package is absent (imports it)."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt as trt

    return str(trt.__version__)


def plan_mismatch(entry: dict[str, Any], gpu: GpuInfo, trt_version: str) -> str | None:
    """Why a plan described by ``entry`` (meta.json) cannot run here; None if it can.
    Plans are specific to the GPU model, its compute capability and the TensorRT version."""
    built = (f"{entry.get('gpu', '?')} (sm{entry.get('compute_capability', '?')}, "
             f"TensorRT {entry.get('tensorrt', '?')})")
    here = f"{gpu.name} ({gpu.sm}, TensorRT {trt_version})"
    if entry.get("gpu") != gpu.name or \
            str(entry.get("compute_capability")) != f"{gpu.major}{gpu.minor}" or \
            entry.get("tensorrt") != trt_version:
        return f"built for {built}, this machine is {here}"
    return None


def plan_settings(entry: dict[str, Any]) -> dict[str, str]:
    """The ``ubc.*`` metadata of a plan: a plan has none of its own, so its meta.json
    record keeps that of the ONNX it was built from (``ubc.export.tensorrt``)."""
    recorded = entry.get("metadata")
    return {str(k): str(v) for k, v in recorded.items()} if isinstance(recorded, dict) else {}


class TensorRTEngine(Engine):
    """A TensorRT plan on CUDA device ``device``. ``precision`` (fp32, fp16, int8) selects the
    plan; ``max_batch`` defaults to the plan's profile maximum and may not exceed it."""

    backend = "tensorrt"
    packages = ("tensorrt", "cuda-bindings")
    install = "pip install ubc[tensorrt]"
    devices = ("cuda",)
    precisions = {"cuda": PLAN_PRECISIONS}
    artifact_kinds = ("plan",)

    @classmethod
    def artifact_for(cls, bundle: Bundle, device: str, precision: str, **options: Any) -> str:
        kind, index = parse_device(device)
        return plan_name(gpu_info(index), tensorrt_version() or "?", precision)

    @classmethod
    def absent(cls, bundle: Bundle, name: str, device: str, precision: str) -> str:
        """Names the GPU and TensorRT of the bundle's plan of this precision, if it has one."""
        others = [n for n in artifacts_of(bundle.meta)
                  if (parse_plan_name(n) or {}).get("precision") == precision]
        hint = rebuild_hint(bundle.path, name)
        if others:
            entry = artifacts_of(bundle.meta)[others[0]]
            mismatch = plan_mismatch(entry, gpu_info(parse_device(device)[1]),
                                     tensorrt_version() or "?")
            return f"its {precision} plan {others[0]} is {mismatch}; rebuild it here from " \
                   f"the bundle's ONNX: `{hint}`"
        return f"the bundle has no {precision} plan for this GPU (build it: `{hint}`)"

    def __init__(self, bundle: Bundle, *, device: str = "cuda", precision: str = "fp16",
                 max_batch: int | None = None) -> None:
        reason = self.unavailable(bundle, device, precision)
        if reason is not None:
            raise BundleError(f"{bundle.path}: tensorrt backend: {reason}")
        import tensorrt as trt

        name = self.artifact_for(bundle, device, precision)
        _, index = parse_device(device)
        cuda_memory.set_device(index)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(bundle.file(name).read_bytes())
        if engine is None:
            raise BundleError(f"{bundle.path / name}: TensorRT {trt.__version__} cannot "
                              f"deserialize this plan (see its log above); rebuild it: "
                              f"`{rebuild_hint(bundle.path, name)}`")
        limit = int(engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])
        max_batch = limit if max_batch is None else max_batch
        if not 1 <= max_batch <= limit:
            raise ValueError(f"max_batch must be within 1..{limit}, the profile of {name}; "
                             "rebuild the plan with a larger --max-batch")
        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        self.artifact = name
        self.check_settings(plan_settings(artifacts_of(bundle.meta).get(name, {})))
        self._runtime, self._engine = runtime, engine
        self._check_io(engine, name)
        self._context = engine.create_execution_context()
        self._allocate()

    def _check_io(self, engine: Any, name: str) -> None:
        trt = self._trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        expected = [INPUT_NAME, *OUTPUT_NAMES]
        if sorted(names) != sorted(expected):
            raise BundleError(f"{name}: tensors {names}, expected {expected}; rebuild it")
        for tensor in expected:
            if engine.get_tensor_dtype(tensor) != trt.DataType.FLOAT:
                raise BundleError(f"{name}: tensor {tensor!r} is "
                                  f"{engine.get_tensor_dtype(tensor)}, expected float32 I/O")

    def _allocate(self) -> None:
        height, width = self.input_size
        shapes = {INPUT_NAME: (self.max_batch, 1, height, width),
                  OUTPUT_NAMES[0]: (self.max_batch, 2),
                  OUTPUT_NAMES[1]: (self.max_batch, 1, height, width)}
        self._host: dict[str, cuda_memory.PinnedArray] = {}
        self._device: dict[str, cuda_memory.DeviceBuffer] = {}
        self._stream: cuda_memory.Stream | None = None
        try:
            self._stream = cuda_memory.Stream()
            for tensor, shape in shapes.items():
                self._host[tensor] = cuda_memory.PinnedArray(shape, np.float32)
                self._device[tensor] = cuda_memory.DeviceBuffer(self._host[tensor].nbytes)
                # Addresses never change: bind once, only the input shape varies per call.
                if not self._context.set_tensor_address(tensor, self._device[tensor].ptr):
                    raise BundleError(f"{self.artifact}: cannot bind tensor {tensor!r}")
        except BaseException:
            self.close()
            raise

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch)
        host_in = self._host[INPUT_NAME]
        np.copyto(host_in.array[:n], batch)
        if not self._context.set_input_shape(INPUT_NAME, batch.shape):
            raise ValueError(f"batch shape {batch.shape} is outside the profile of "
                             f"{self.artifact}")
        stream = self._stream
        if stream is None:
            raise RuntimeError(f"{self!r} has no stream (closed)")
        cuda_memory.copy_to_device(self._device[INPUT_NAME], host_in, batch.nbytes, stream)
        if not self._context.execute_async_v3(stream.handle):
            raise RuntimeError(f"{self.artifact}: TensorRT execution failed (see its log)")
        outputs = []
        for tensor in OUTPUT_NAMES:
            host = self._host[tensor]
            nbytes = host.nbytes // self.max_batch * n
            cuda_memory.copy_to_host(host, self._device[tensor], nbytes, stream)
            outputs.append(host)
        stream.synchronize()
        # Copies: the pinned buffers are overwritten by the next call.
        return outputs[0].array[:n].copy(), outputs[1].array[:n].copy()

    def _release(self) -> None:
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.synchronize()
        for buffer in [*getattr(self, "_device", {}).values(),
                       *getattr(self, "_host", {}).values()]:
            buffer.close()
        if stream is not None:
            stream.close()
        self._stream = None
        self._host, self._device = {}, {}
        self._context = None
        self._engine = None
