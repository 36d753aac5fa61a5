"""Device memory, pinned host memory, streams and async copies through cuda-python
(``cuda.bindings.runtime``), under the TensorRT engine and the TensorRT exporter's INT8
calibrator.

pycuda is not used: it builds only against a local CUDA toolkit and libcuda, which our
machines lack (no cuda.h, no -lcuda), while cuda-bindings ships as wheels, comes with torch
and is NVIDIA's maintained binding (engines issue). Nothing here imports torch or tensorrt,
so this module can be tested on any GPU machine on its own.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np

from ubc.errors import UBCError

INSTALL_HINT = "pip install ubc[tensorrt] (it brings cuda-bindings)"


class CudaError(UBCError):
    """A CUDA runtime call failed; the message names the call and CUDA's own words."""


def _runtime() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise ImportError(f"cuda-bindings is not installed ({INSTALL_HINT})") from exc
    return runtime


def check(call: str, result: tuple[Any, ...]) -> Any:
    """Unpack a ``cuda.bindings.runtime`` result ``(err, *values)``; CudaError on failure."""
    runtime = _runtime()
    err, *values = result
    if err != runtime.cudaError_t.cudaSuccess:
        _, name = runtime.cudaGetErrorName(err)
        _, text = runtime.cudaGetErrorString(err)
        raise CudaError(f"{call} failed: {name.decode()} ({text.decode()})"
                        + ("; is an NVIDIA driver installed and a GPU visible?"
                           if err in (runtime.cudaError_t.cudaErrorInsufficientDriver,
                                      runtime.cudaError_t.cudaErrorNoDevice) else ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def set_device(index: int) -> None:
    """Make GPU ``index`` current for this thread's later allocations and launches."""
    check("cudaSetDevice", _runtime().cudaSetDevice(index))


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc); ``ptr`` is its address as an int;
    ``close`` frees it (idempotent)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        self.nbytes = int(nbytes)
        self.ptr: int = int(check("cudaMalloc", _runtime().cudaMalloc(self.nbytes)))

    def close(self) -> None:
        if self.ptr:
            check("cudaFree", _runtime().cudaFree(self.ptr))
            self.ptr = 0


class PinnedArray:
    """A NumPy array in page-locked host memory (cudaMallocHost), so copies to and from the
    device are truly asynchronous. Use ``array``; ``close`` releases the memory (and
    invalidates ``array``)."""

    def __init__(self, shape: Sequence[int], dtype: np.dtype[Any] | type = np.float32) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        if self.nbytes <= 0:
            raise ValueError(f"shape {self.shape} holds no elements")
        self.ptr: int = int(check("cudaMallocHost", _runtime().cudaMallocHost(self.nbytes)))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array: np.ndarray = np.frombuffer(memoryview(raw), dtype=self.dtype)
        self.array = self.array.reshape(self.shape)

    def close(self) -> None:
        if self.ptr:
            self.array = np.empty(0, self.dtype)  # drop the view before the memory goes
            check("cudaFreeHost", _runtime().cudaFreeHost(self.ptr))
            self.ptr = 0


class Stream:
    """A non-blocking CUDA stream; ``handle`` is what TensorRT's ``execute_async_v3`` takes."""

    def __init__(self) -> None:
        runtime = _runtime()
        self._stream = check("cudaStreamCreateWithFlags",
                             runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking))
        self.handle = int(self._stream)

    def synchronize(self) -> None:
        check("cudaStreamSynchronize", _runtime().cudaStreamSynchronize(self._stream))

    def close(self) -> None:
        if self.handle:
            check("cudaStreamDestroy", _runtime().cudaStreamDestroy(self._stream))
            self.handle = 0


def copy_to_device(dst: DeviceBuffer, src: PinnedArray, nbytes: int, stream: Stream) -> None:
    """Queue a copy of the first ``nbytes`` of ``src`` to ``dst`` on ``stream``."""
    if nbytes > min(dst.nbytes, src.nbytes):
        raise ValueError(f"copy of {nbytes} bytes exceeds a buffer "
                         f"(host {src.nbytes}, device {dst.nbytes})")
    runtime = _runtime()
    check("cudaMemcpyAsync(host->device)",
          runtime.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes,
                                  runtime.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle))


def copy_to_host(dst: PinnedArray, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    """Queue a copy of the first ``nbytes`` of ``src`` to ``dst`` on ``stream``."""
    if nbytes > min(dst.nbytes, src.nbytes):
        raise ValueError(f"copy of {nbytes} bytes exceeds a buffer "
                         f"(device {src.nbytes}, host {dst.nbytes})")
    runtime = _runtime()
    check("cudaMemcpyAsync(device->host)",
          runtime.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes,
                                  runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle))


def round_trip(values: np.ndarray) -> np.ndarray:
    """Copy ``values`` host -> device -> host through pinned buffers on one stream (the
    whole path the TensorRT engine uses, without TensorRT: a GPU self-test)."""
    values = np.ascontiguousarray(values)
    owned: list[Any] = []
    try:
        stream = Stream()
        owned.append(stream)
        host_in = PinnedArray(values.shape, values.dtype)
        owned.append(host_in)
        host_out = PinnedArray(values.shape, values.dtype)
        owned.append(host_out)
        device = DeviceBuffer(values.nbytes)
        owned.append(device)
        np.copyto(host_in.array, values)
        copy_to_device(device, host_in, values.nbytes, stream)
        copy_to_host(host_out, device, values.nbytes, stream)
        stream.synchronize()
        return host_out.array.copy()
    finally:
        for resource in reversed(owned):
            resource.close()
