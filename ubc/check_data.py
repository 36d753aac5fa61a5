"""The data ``ubc-export`` checks and calibrates on, handed to ``ubc.parity`` by its caller:
preprocessed slices (of synthetic phantoms, an archive, NIfTI volumes or a ``.npy``) and the
held-out phantoms of the case gates. Training side: it writes phantoms (``ubc.synth``) and
samples archives (``ubc.data``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ubc.bundle import Preprocessing
from ubc.parity import MIN_SLICES


def phantom_slices(preprocessing: Preprocessing, n: int = MIN_SLICES, *, seed: int = 0,
                   cases: int = 8, shape: tuple[int, int, int] = (240, 240, 155),
                   end_fraction: float = 0.0) -> np.ndarray:
    """float32 [n, 1, H, W]: slices of synthetic phantoms (``ubc.synth``) written as NIfTI and
    read back through ``ubc.io`` and ``ubc.preprocess``, half of them through the lesion
    (``ubc.data.sample_slices``)."""
    from ubc.data import sample_slices
    from ubc.synth import write_archive

    with tempfile.TemporaryDirectory(prefix="ubc-parity-") as tmp:
        archive = write_archive(Path(tmp), cases, seed=seed, shape=shape)
        return sample_slices(archive, preprocessing, n, seed=seed, end_fraction=end_fraction)


def volume_slices(paths: Sequence[str | os.PathLike[str]], preprocessing: Preprocessing,
                  n: int = MIN_SLICES) -> np.ndarray:
    """float32 [n, 1, H, W]: the slices with the most brain of real volumes (NIfTI files),
    spread evenly over the files, through ``ubc.io`` and ``ubc.preprocess``."""
    from ubc import preprocess
    from ubc.io import load_volume

    if not paths:
        raise ValueError("no volume files given")
    per_file = -(-n // len(paths))
    out = []
    for path in paths:
        volume = load_volume(path)
        counts = preprocess.foreground_counts(volume.data)
        picks = np.sort(np.argsort(-counts, kind="stable")[:per_file])
        out.append(preprocess.slices(volume.data, volume.spacing, size=preprocessing.size,
                                     target_spacing=preprocessing.target_spacing,
                                     norm=preprocessing.norm, slice_indices=picks))
    return np.ascontiguousarray(np.concatenate(out)[:n])


def slices_from(paths: Sequence[str | os.PathLike[str]], preprocessing: Preprocessing,
                n: int = MIN_SLICES, *, seed: int = 0, end_fraction: float = 0.0
                ) -> tuple[np.ndarray, str]:
    """(float32 [n, 1, H, W] slices, a description of where they came from) out of
    ``paths``: nothing (synthetic phantoms), one ``.npy`` of preprocessed slices, one
    archive folder (``ubc.data.discover`` layouts) or NIfTI volumes. ``end_fraction``: as
    ``ubc.data.sample_slices`` (phantoms and archives)."""
    if not paths:
        cases = min(8, max(1, n // 8))
        return phantom_slices(preprocessing, n, seed=seed, cases=cases,
                              end_fraction=end_fraction), \
            f"{n} slices of {cases} phantoms (ubc.synth, seed {seed})"
    files = [Path(p) for p in paths]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise FileNotFoundError(f"slice source(s) not found: {', '.join(missing)}")
    if len(files) == 1 and files[0].suffix == ".npy":
        slices = np.load(files[0], allow_pickle=False).astype(np.float32)
        return slices[:n], f"{min(n, len(slices))} slices from {files[0]}"
    if len(files) == 1 and files[0].is_dir():
        from ubc.data import sample_slices

        ends = f", {end_fraction:.0%} of the rest at the brain's ends" if end_fraction else ""
        return sample_slices(files[0], preprocessing, n, seed=seed, end_fraction=end_fraction), \
            f"{n} slices of the archive {files[0]} (per case: half through its largest " \
            f"lesion{ends})"
    return volume_slices(files, preprocessing, n), \
        f"{n} slices of {', '.join(p.name for p in files)}"


def phantom_archive(folder: Path, preprocessing: Preprocessing) -> Path:
    """6 synthetic phantoms (seed 2: neither the calibration's nor the parity's) whose
    field of view fits the bundle's (1 mm voxels, 48 axial slices), in ``folder/held-out``."""
    from ubc.synth import write_archive

    size, spacing = preprocessing.size, preprocessing.target_spacing
    shape = (int(size[0] * spacing[0]), int(size[1] * spacing[1]), 48)
    return write_archive(folder / "held-out", 6, seed=2, shape=shape)
