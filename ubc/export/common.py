"""What every exporter shares: the result type, the example batch, the artifact entry."""

from __future__ import annotations

import time
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
