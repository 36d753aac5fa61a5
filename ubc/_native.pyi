# Type stub of the compiled module (csrc/bindings/module.cpp); see ubc.preprocess for docs.
# Every `out` is refused (ValueError), never converted, unless it is exactly what is written.
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

def slices(volume: np.ndarray, spacing: Sequence[float], size: Sequence[int],
           target_spacing: Sequence[float], norm: str, indices: npt.NDArray[np.int64],
           threads: int, out: npt.NDArray[np.float32]) -> None: ...
def mask_slices(labels: np.ndarray, spacing: Sequence[float], size: Sequence[int],
                target_spacing: Sequence[float], indices: npt.NDArray[np.int64],
                threads: int, out: npt.NDArray[np.uint8]) -> None: ...
def lesion_areas(labels: np.ndarray, spacing: Sequence[float],
                 indices: npt.NDArray[np.int64], threads: int,
                 out: npt.NDArray[np.float64]) -> None: ...
def foreground_counts(volume: np.ndarray, threads: int, out: npt.NDArray[np.int64]) -> None: ...
def to_original(values: npt.NDArray[np.float32], spacing: Sequence[float],
                target_spacing: Sequence[float], indices: npt.NDArray[np.int64],
                threads: int, out: npt.NDArray[np.float32]) -> None: ...
def lesion_pixels(logits: npt.NDArray[np.float32], images: npt.NDArray[np.float32],
                  counts: npt.NDArray[np.int64],
                  probs: npt.NDArray[np.uint16] | None = None,
                  image_halves: npt.NDArray[np.uint16] | None = None) -> None: ...
def to_original_mask(values: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
                     spacing: Sequence[float], target_spacing: Sequence[float],
                     indices: npt.NDArray[np.int64],
                     threshold: float, threads: int, out: npt.NDArray[np.uint8]) -> None: ...
def dicom_walk(buffer: bytes, pos: int, explicit_vr: bool, complete: bool,
               wanted: Sequence[int]) -> tuple[str, list[tuple[int, bytes, int, int]],
                                               tuple[int, int] | None]: ...

# The core's limits (csrc/core/preprocess.hpp); beyond them the functions raise ValueError.
MAX_AXIS: int
MAX_SLICE_VOXELS: int
MAX_VOXELS: int
MAX_SIDE: int
MAX_RATIO: float
