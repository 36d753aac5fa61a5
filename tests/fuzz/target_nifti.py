"""Fuzz target ``nifti``: bytes written to a file, read by ``ubc.io.load_volume`` and cut into
model slices by ``ubc.preprocess.slices``, as ``ubc-infer`` treats every file of an archive.

Allowed outcomes: a volume whose slices are finite, ``UBCInputError`` from the loader, or one
of the preprocessing refusals below for a volume the loader rightly accepted (NaN voxels, an
empty or constant scan). Anything else, a warning included, is a finding: a voxel type the
loader accepts and preprocessing refuses too (int8 and uint32 once were).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

NAME = "nifti"
INSTRUMENT = ("ubc", "nibabel")
SEEDS = Path(__file__).resolve().parent / "corpus" / NAME
REGRESSIONS = Path(__file__).resolve().parent / "regressions" / NAME
SIZE = (32, 32)
# Refusals by ubc.preprocess of a volume that load_volume may rightly return.
PREPROCESS_REFUSALS = ("NaN/Inf voxels", "no foreground", "foreground is constant",
                       "beyond the native core's limits",
                       "give both spacings in mm")  # a spacing ratio past MAX_RATIO


def prepare() -> Callable[[bytes], None]:
    """Import the code under test (after the driver started instrumenting it) and return the
    function that runs one input."""
    import logging

    # nibabel logs each header problem it fixes: noise at thousands of inputs per second.
    logging.getLogger("nibabel").setLevel(logging.ERROR)
    from ubc.errors import UBCInputError
    from ubc.io import load_volume

    path = Path(tempfile.mkdtemp(prefix="ubc-fuzz-nifti-")) / "input.nii"

    def one_input(data: bytes) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # as pytest runs: a warning is a finding
            run(data)

    def run(data: bytes) -> None:
        path.write_bytes(data)
        try:
            volume = load_volume(path, volume_index=0)
        except UBCInputError as exc:
            assert str(path) in str(exc), f"error does not name the file: {exc}"
            return
        check_volume(volume)

    return one_input


def check_volume(volume: Any) -> None:
    """A 3-D volume with a finite grid whose slices pass ``check_slices`` (shared by every
    volume file reader's target)."""
    assert volume.data.ndim == 3 and min(volume.data.shape) > 0, volume.data.shape
    assert all(math.isfinite(s) and s > 0 for s in volume.spacing), volume.spacing
    assert np.isfinite(volume.affine).all(), volume.affine
    check_slices(volume)


def check_slices(volume: Any) -> None:
    """The volume's model slices are finite, or ``ubc.preprocess`` refuses it with one of
    ``PREPROCESS_REFUSALS`` (shared by every volume reader's target)."""
    from ubc import preprocess

    try:
        out = preprocess.slices(volume.data, volume.spacing, size=SIZE, threads=1)
    except (ValueError, TypeError) as exc:
        if not any(words in str(exc) for words in PREPROCESS_REFUSALS):
            raise
        return
    assert out.shape == (volume.data.shape[2], 1, *SIZE), out.shape
    assert np.isfinite(out).all()
