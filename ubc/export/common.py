"""What every exporter shares: the result type, the example batch, the artifact entry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ubc.artifacts import WEIGHTS
from ubc.bundle import Bundle

SERVED_ARCHS = ("ubc-resnet34",)


@dataclass(frozen=True)
class ExportResult:
    """One artifact written into a bundle: its name, path, build time and description."""

    name: str
    path: Path
    seconds: float
    description: dict[str, Any] = field(default_factory=dict)


def check_arch(bundle: Bundle) -> None:
    """Engines return a mask: a bundle of the mask-less baseline cannot be exported."""
    if bundle.arch not in SERVED_ARCHS:
        raise ValueError(f"{bundle.path}: architecture {bundle.arch!r} has no mask head; "
                         f"only {', '.join(SERVED_ARCHS)} bundles are exported for serving")


def example_batch(bundle: Bundle, example: np.ndarray | None, batch: int = 2) -> np.ndarray:
    """The batch an exporter traces with: ``example`` (preprocessed slices) checked against
    the bundle's input size, or standard-normal slices of that size (the graph of this model
    does not depend on the values, only on the shape)."""
    height, width = bundle.preprocessing.size
    if example is None:
        rng = np.random.default_rng(0)
        return rng.standard_normal((batch, 1, height, width), dtype=np.float32)
    example = np.ascontiguousarray(example, dtype=np.float32)
    if example.ndim != 4 or example.shape[1:] != (1, height, width) or len(example) == 0:
        raise ValueError(f"example slices must have shape [B, 1, {height}, {width}] for "
                         f"{bundle.path}, got {list(example.shape)}")
    return example[:max(batch, 1)]


def artifact_entry(bundle: Bundle, fmt: str, **details: Any) -> dict[str, Any]:
    """The ``meta["artifacts"]`` description of a new artifact: what and from which weights."""
    from importlib import metadata

    try:
        torch_version: str | None = metadata.version("torch").split("+")[0]
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"format": fmt, "weights_sha256": bundle.meta["files"][WEIGHTS],
            "input_size": list(bundle.preprocessing.size), "torch": torch_version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}


class CalibrationBatches:
    """Full batches of ``batch`` slices, in order, from preprocessed ``slices`` (float32
    [N, 1, H, W]); the remainder that does not fill a batch is left out (TensorRT's
    calibrator wants one batch size). Every INT8 exporter calibrates through it."""

    def __init__(self, slices: np.ndarray, batch: int, size: tuple[int, int]) -> None:
        if slices.ndim != 4 or slices.shape[1:] != (1, *size):
            raise ValueError(f"calibration slices must be float32 [N, 1, {size[0]}, {size[1]}],"
                             f" got {list(slices.shape)}")
        if len(slices) < batch:
            raise ValueError(f"INT8 calibration needs at least one batch of {batch} slices, "
                             f"got {len(slices)}; give more with --calib")
        self.slices = np.ascontiguousarray(slices, dtype=np.float32)
        self.batch = batch

    def __len__(self) -> int:
        return len(self.slices) // self.batch

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.slices[i * self.batch:(i + 1) * self.batch]
