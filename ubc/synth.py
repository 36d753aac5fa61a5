"""Synthetic brain-MRI phantoms with glioma-like lesions, written as a BraTS-layout archive.

A phantom is a skull-stripped, head-like FLAIR volume: an irregular ellipsoidal brain with a
cortical ribbon, two ventricles (dark on FLAIR), smooth tissue texture, a multiplicative bias
field, Rician noise and a random scanner gain; plus one lesion whose *grade shows in its
structure*, not in its size (both grades draw the same size distribution):

Nuisance is explicit and independent of the grade: a per-case noise level drawn from
``SynthConfig.noise``, a smooth zero-mean bias field, a random scanner gain, and 0 to
``SynthConfig.spots`` small unlabelled white-matter-hyperintensity-like spots in both grades
(so "a bright blob exists" is no shortcut to either grade).

- LGG-like: a diffuse, smooth, homogeneous hyperintensity with a blurred border, labelled
  mostly oedema (2) with a small non-enhancing core (1) of the same brightness.
- HGG-like: an irregular, lobulated lesion with a heterogeneous necrotic core (1, darker),
  an enhancing rim (4) and surrounding oedema (2) with finger-like extensions.

``SynthConfig`` holds the knobs that set how hard the task is (``core_contrast`` is how
visible the HGG core is; ``overlap`` is the fraction of cases drawn with the other grade's
appearance, which caps any classifier's accuracy at about ``1 - overlap``).

Geometry: 1 mm isotropic voxels, stored like BraTS with LPS axis codes (affine
``diag(-1, -1, 1)``, origin at the volume centre), so readers exercise the reorientation to
RAS. ``phantom`` returns arrays in that on-disk voxel order. The archive layout is
``OUT/HGG/<case>/<case>_flair.nii.gz``, ``..._seg.nii.gz`` (same for LGG) and
``OUT/labels.csv`` with columns ``case_id,grade``, and ``OUT/ubc-synth.json``, the settings
(format, cases, seed, shape, ``SynthConfig``) that say the archive is synthetic
(``ubc-train`` records it in the bundle, ``ubc.provenance``). Files are gzip level 1 with
mtime 0, so the same seed gives the same bytes.

``write_dicom_archive`` writes the same phantoms (same seed, same voxels) as DICOM: one study
per case in ``OUT/<case>/``, a FLAIR series (``1_FLAIR/``, files without extension) and a
decoy T1 series (``2_T1/``) on the same grid. Case ``i`` is stored as a standard axial LPS
stack (``i % 3 == 0``, instances numbered from the top), an oblique stack (``1``: rotated
12 degrees about x and 5 about y) or one Enhanced MR multi-frame instance (``2``).
``labels.csv`` has ``case_id`` = StudyInstanceUID (the default DICOM case id), ``grade``
and ``patient_id``. UIDs derive from (seed, case), so the same seed gives the same studies.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ubc.atomic import atomic_write_bytes

__all__ = ["GRADES", "SynthConfig", "phantom", "looks_hgg", "case_looks_hgg", "phantom_affine",
           "write_archive", "write_dicom_archive", "dicom_affine"]

GRADES = ("LGG", "HGG")  # label 0, label 1
LABELS_FILE = "labels.csv"
_Row = tuple[str, ...]  # a labels.csv row
_HGG_SHRINK = 0.92  # measured over 200 phantoms: similar top-5 lesion areas for both grades


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the phantom benchmark (intensities relative to white matter = 1).

    ``lesion_contrast``: oedema brightness above white matter. ``core_contrast``: how much
    darker the HGG necrotic core is than its oedema (0 makes the grade invisible).
    ``irregularity``: lobulation amplitude of HGG borders. ``noise``: (min, max) of the
    per-case Rician sigma. ``bias``: log-amplitude of the bias field. ``texture``: tissue
    texture amplitude. ``overlap``: fraction of cases that look like the other grade (it
    caps any classifier's accuracy, and a perfect score's AUC, at about ``1 - overlap``).
    ``lesion_radius``: (min, max) lesion radius as a fraction of the brain's x half-width.
    ``core_size``: radius of the HGG core + rim as a fraction of the lesion radius (the
    necrotic core is 60 % of that). ``min_core_mm``: the necrotic core's radius is at least
    this (6 mm = 2 pixels at the sweep's 3 mm), as long as the core stays inside the lesion.
    ``spots``: at most this many unlabelled bright spots (``spot_radius_mm``) per case.
    """

    lesion_contrast: float = 0.55
    core_contrast: float = 0.6
    irregularity: float = 0.35
    noise: tuple[float, float] = (0.05, 0.11)
    bias: float = 0.25
    texture: float = 0.08
    overlap: float = 0.1
    lesion_radius: tuple[float, float] = (0.22, 0.42)
    core_size: float = 0.6
    min_core_mm: float = 6.0
    spots: int = 3
    spot_radius_mm: tuple[float, float] = (1.5, 3.5)


def phantom_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """4x4 affine of a phantom: 1 mm voxels, LPS axis codes, world origin at the centre."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [(shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0, -(shape[2] - 1) / 2.0]
    return affine


def _kernel(n_out: int, n_grid: int) -> np.ndarray:
    """[n_out, n_grid] Gaussian interpolation weights: a smooth field from a coarse grid."""
    pos = np.linspace(0.0, 1.0, n_out, dtype=np.float32)[:, None]
    nodes = np.linspace(-0.1, 1.1, n_grid, dtype=np.float32)[None, :]
    width = 1.2 / max(n_grid - 1, 1)
    weights = np.exp(-0.5 * ((pos - nodes) / width) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _bumps(shape: tuple[int, int, int], per: int, least: int) -> tuple[int, int, int]:
    """A coarse grid with one node per ``per`` voxels along each axis, at least ``least``."""
    return (max(least, shape[0] // per), max(least, shape[1] // per),
            max(least, shape[2] // per))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int],
                  grid: tuple[int, int, int]) -> np.ndarray:
    """float32 field of ``shape`` with unit-ish amplitude and ``grid`` bumps per axis."""
    coarse = rng.standard_normal(grid).astype(np.float32)
    kx, ky, kz = (_kernel(n, g) for n, g in zip(shape, grid, strict=True))
    small = np.tensordot(kx, coarse, axes=(1, 0))  # [X, gy, gz]
    small = np.tensordot(small, ky, axes=(1, 1)).transpose(0, 2, 1)  # [X, Y, gz]
    field = np.ascontiguousarray(small) @ kz.T  # [X, Y, Z], one BLAS call
    sample = field[::3, ::3, ::3]  # a strided estimate is enough, and cheap
    # zero mean: otherwise exp(bias * field) is a random global gain (SNR varying ~10x
    # between cases) and a "bend" of a lesion border scales the whole lesion
    return (field - np.float32(sample.mean())) * np.float32(1.0 / max(float(sample.std()), 1e-6))


def _box(shape: tuple[int, int, int], centre: np.ndarray,
         half: np.ndarray) -> tuple[slice, slice, slice]:
    """The index box centre +- half (voxels), clipped to the volume."""
    lo = np.clip(np.floor(centre - half), 0, shape).astype(int)
    hi = np.clip(np.ceil(centre + half) + 1, 0, shape).astype(int)
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))


def _shape_of(box: tuple[slice, slice, slice]) -> tuple[int, int, int]:
    return (box[0].stop - box[0].start, box[1].stop - box[1].start, box[2].stop - box[2].start)


def _origin(box: tuple[slice, slice, slice]) -> np.ndarray:
    return np.array([b.start for b in box], np.float32)


def _grid(shape: tuple[int, int, int], centre: np.ndarray,
          radii: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal radius ||(x - centre) / radii|| (float32, broadcast grid)."""
    axes = [((np.arange(n, dtype=np.float32) - c) / r) ** 2
            for n, c, r in zip(shape, centre, radii, strict=True)]
    return np.sqrt(axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :])


def _brain(rng: np.random.Generator, shape: tuple[int, int, int],
           cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(brain mask bool, FLAIR-like tissue float32, brain centre, brain radii) in voxels."""
    dims = np.asarray(shape, dtype=np.float32)
    centre = dims / 2.0 + rng.normal(0.0, 0.015, 3).astype(np.float32) * dims
    radii = dims * np.array([0.30, 0.37, 0.40], np.float32) * rng.uniform(0.9, 1.05, 3)
    r = _grid(shape, centre, radii) - 0.05 * _smooth_field(rng, shape, (5, 5, 4))
    brain = r < 1.0
    tissue = np.where(r > 0.86, 1.15, 1.0).astype(np.float32)  # cortical ribbon (GM)
    for side in (-1.0, 1.0):  # ventricles: CSF is dark on FLAIR
        vc = centre + np.array([side * 0.12, 0.02, 0.05], np.float32) * radii
        vr = radii * np.array([0.09, 0.32, 0.18], np.float32) * rng.uniform(0.7, 1.3)
        box = _box(shape, vc, vr)
        inside = _grid(_shape_of(box), vc - _origin(box), vr) < 1.0
        tissue[box][inside] = 0.25
    tissue *= 1.0 + cfg.texture * _smooth_field(rng, shape, _bumps(shape, 12, 3))
    return brain, tissue, centre, radii


def _lesion_centre(rng: np.random.Generator, centre: np.ndarray, radii: np.ndarray,
                   lesion_r: float) -> np.ndarray:
    """A centre inside the brain, off the midline, that keeps most of the lesion inside."""
    for _ in range(100):
        offset = rng.uniform(-1.0, 1.0, 3) * np.array([0.55, 0.6, 0.5])
        if abs(offset[0]) > 0.2 and np.linalg.norm(offset) < 0.75 - lesion_r / radii[0] / 2:
            break
    return (centre + offset * radii).astype(np.float32)


def _lesion(rng: np.random.Generator, shape: tuple[int, int, int], centre: np.ndarray,
            radii: np.ndarray, hgg_look: bool,
            cfg: SynthConfig) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray]:
    """(box, labels uint8 with BraTS codes 0/1/2/4, FLAIR intensity offset float32), the
    arrays covering only ``box`` of the volume (the lesion's neighbourhood)."""
    lesion_r = float(rng.uniform(*cfg.lesion_radius)) * float(radii[0])
    lc = _lesion_centre(rng, centre, radii, lesion_r)
    lr = lesion_r * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    if hgg_look:  # a lobulated border adds area; shrink so both grades match in size
        lr *= np.float32(_HGG_SHRINK)
    box = _box(shape, lc, lr * (1.2 + 2 * cfg.irregularity))
    shape = _shape_of(box)
    d = _grid(shape, lc - _origin(box), lr)
    labels = np.zeros(shape, np.uint8)
    # Both grades bend their border by the same amount (so sizes match); HGG borders bend at
    # a fine scale (lobulated, finger-like), LGG borders at a coarse one (smooth).
    fine = _bumps(shape, 10, 4)
    scale, amount = (fine, cfg.irregularity) if hgg_look else ((3, 3, 3), cfg.irregularity / 2)
    # clipped: a rare extreme of the field would otherwise erase the lesion altogether
    bend = np.clip(_smooth_field(rng, shape, scale), -2.0, 2.0)
    d_edema = d - amount * bend
    if hgg_look:
        # the core's radius (60 % of core_size) is at least min_core_mm, within 80 % of lr
        core_size = min(max(cfg.core_size, cfg.min_core_mm / (0.6 * float(lr.min()))), 0.8)
        d_core = d / core_size - 0.3 * cfg.irregularity * np.clip(
            _smooth_field(rng, shape, fine), -1.5, 1.5)
        necro = d_core < 0.6
        rim = (d_core < 1.0) & ~necro
        edema = (d_edema < 1.0) & ~necro & ~rim
        speckle = _smooth_field(rng, shape, _bumps(shape, 6, 4))
        offset = np.where(edema, cfg.lesion_contrast, 0.0)
        offset = np.where(rim, 0.7 * cfg.lesion_contrast, offset)
        core = cfg.lesion_contrast - cfg.core_contrast * (1.0 + 0.35 * speckle)
        offset = np.where(necro, core, offset)
        labels[edema], labels[rim], labels[necro] = 2, 4, 1
    else:
        lesion = d_edema < 1.0
        labels[lesion] = 2
        labels[lesion & (d < 0.35)] = 1  # a non-enhancing core, as bright as the rest
        # diffuse: brightness fades smoothly across the labelled border
        offset = cfg.lesion_contrast / (1.0 + np.exp(np.minimum((d_edema - 1.0) / 0.08, 50.0)))
    return box, labels, offset.astype(np.float32)


def _spots(rng: np.random.Generator, shape: tuple[int, int, int], brain: np.ndarray,
           centre: np.ndarray, radii: np.ndarray, cfg: SynthConfig) -> np.ndarray:
    """float32 intensity offset of 0..``cfg.spots`` small bright unlabelled white-matter
    spots (grade-independent nuisance: a bright blob exists in both grades)."""
    offset = np.zeros(shape, np.float32)
    for _ in range(int(rng.integers(0, cfg.spots + 1))):
        at = (centre + rng.uniform(-0.6, 0.6, 3) * radii).astype(np.float32)
        r = np.full(3, rng.uniform(*cfg.spot_radius_mm), np.float32)
        box = _box(shape, at, 2 * r)
        d = _grid(_shape_of(box), at - _origin(box), r)
        offset[box] += cfg.lesion_contrast * np.exp(-d ** 2)
    return np.where(brain, offset, 0.0).astype(np.float32)


def looks_hgg(seed: int | np.random.SeedSequence, grade: int,
              config: SynthConfig | None = None) -> bool:
    """Whether ``phantom(seed, grade=grade, config=config)`` has the HGG appearance (the
    grade's own, except for the ``overlap`` fraction of cases)."""
    cfg = config or SynthConfig()
    return _looks_hgg(np.random.default_rng(seed), grade, cfg)


def case_looks_hgg(case_id: str, grade: int, *, seed: int,
                   config: SynthConfig | None = None) -> bool:
    """``looks_hgg`` of case ``case_id`` of ``write_archive(..., seed=seed, config=config)``."""
    return looks_hgg(_case_seed(seed, int(case_id.rsplit("_", 1)[1])), grade, config)


def _case_seed(seed: int, i: int) -> np.random.SeedSequence:
    """The seed of case ``i`` of an archive: it depends only on (seed, i)."""
    return np.random.SeedSequence([seed, i])


def _looks_hgg(rng: np.random.Generator, grade: int, cfg: SynthConfig) -> bool:
    return bool(grade) != bool(rng.random() < cfg.overlap)


def phantom(seed: int | np.random.SeedSequence, *, grade: int,
            shape: tuple[int, int, int] = (240, 240, 155),
            config: SynthConfig | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """One phantom: (FLAIR int16 [X, Y, Z], seg uint8 [X, Y, Z] in BraTS codes, grade).

    ``grade`` is 0 (LGG) or 1 (HGG). Arrays are in on-disk voxel order (LPS, see
    ``phantom_affine``); background voxels are exactly 0, brain voxels at least 1.
    """
    if grade not in (0, 1):
        raise ValueError(f"grade must be 0 (LGG) or 1 (HGG), got {grade!r}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3 sizes >= 8 voxels, got {shape}")
    cfg = config or SynthConfig()
    rng = np.random.default_rng(seed)
    hgg_look = _looks_hgg(rng, grade, cfg)
    brain, tissue, centre, radii = _brain(rng, shape, cfg)
    box, box_labels, offset = _lesion(rng, shape, centre, radii, hgg_look, cfg)
    labels = np.zeros(shape, np.uint8)
    labels[box] = np.where(brain[box], box_labels, 0)
    tissue += np.where(labels == 0, _spots(rng, shape, brain, centre, radii, cfg), 0.0)
    tissue[box] += offset
    signal = tissue * np.exp(cfg.bias * _smooth_field(rng, shape, (3, 3, 3)))
    sigma = np.float32(rng.uniform(*cfg.noise))
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n2 = rng.standard_normal(shape, dtype=np.float32)
    signal = np.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2)
    gain = float(rng.uniform(250.0, 900.0))
    flair = np.where(brain, np.clip(np.rint(signal * gain), 1, 32767), 0).astype(np.int16)
    return flair, labels, grade


def _nifti_gz(data: np.ndarray, path: Path) -> None:
    """Write ``data`` as .nii.gz with the phantom affine; deterministic bytes, atomic."""
    image = nib.Nifti1Image(data, phantom_affine(data.shape))
    image.header.set_xyzt_units("mm")
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=1)
    atomic_write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def _each_phantom(cases: int, seed: int, shape: tuple[int, int, int],
                  config: SynthConfig | None, progress: bool, unit: str,
                  write: Callable[[int, str, np.ndarray, np.ndarray, int], _Row]) -> list[_Row]:
    """``write(i, case id, flair, seg, grade)`` of every case of the archive, the cases made
    on a thread per usable core (NumPy and zlib release the GIL on whole volumes); returns
    what ``write`` returned, in case order."""
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    grades = _grades(cases, seed)

    def one(i: int) -> _Row:
        flair, seg, grade = phantom(_case_seed(seed, i), grade=grades[i], shape=shape,
                                    config=config)
        return write(i, f"PH{seed:03d}_{i:04d}", flair, seg, grade)

    pool = ThreadPoolExecutor(min(cases, len(os.sched_getaffinity(0))))
    try:
        rows: Iterable[_Row] = pool.map(one, range(cases))
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, total=cases, desc="phantoms", unit=unit)
        return list(rows)
    finally:
        pool.shutdown(cancel_futures=True)


def _write_labels(root: Path, header: list[str], rows: list[_Row]) -> None:
    with open(root / LABELS_FILE, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_marker(root: Path, kind: str, cases: int, seed: int, shape: tuple[int, int, int],
                  config: SynthConfig | None) -> None:
    """``SYNTH_MARKER`` in the archive root: the archive is synthetic, and how it was made."""
    from ubc.provenance import SYNTH_MARKER

    settings = {"generator": "ubc-synth", "format": kind, "cases": cases, "seed": seed,
                "shape": list(shape), "config": asdict(config or SynthConfig())}
    atomic_write_bytes(root / SYNTH_MARKER,
                       (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())


def write_archive(out_dir: str | os.PathLike[str], cases: int, *, seed: int = 0,
                  shape: tuple[int, int, int] = (240, 240, 155),
                  config: SynthConfig | None = None, progress: bool = False) -> Path:
    """Write ``cases`` phantoms (half LGG, half HGG, order shuffled by ``seed``) in the
    BraTS 2019 layout under ``out_dir`` plus ``labels.csv``; returns ``out_dir``.

    Case ``i`` depends only on (seed, i), so a larger archive extends a smaller one.
    """
    root = Path(out_dir)

    def write(_i: int, case_id: str, flair: np.ndarray, seg: np.ndarray,
              grade: int) -> _Row:
        folder = root / GRADES[grade] / case_id
        folder.mkdir(parents=True, exist_ok=True)
        _nifti_gz(flair, folder / f"{case_id}_flair.nii.gz")
        _nifti_gz(seg, folder / f"{case_id}_seg.nii.gz")
        return (case_id, GRADES[grade])

    rows = _each_phantom(cases, seed, shape, config, progress, "case", write)
    _write_labels(root, ["case_id", "grade"], rows)
    _write_marker(root, "nifti", cases, seed, shape, config)
    return root


def _grades(cases: int, seed: int) -> list[int]:
    """Balanced grades for case 0..cases-1: pairs (LGG, HGG) in a seeded order per pair."""
    grades = []
    for pair in range((cases + 1) // 2):
        flip = np.random.default_rng([seed, 1_000_003, pair]).random() < 0.5
        grades.extend([1, 0] if flip else [0, 1])
    return grades[:cases]


def dicom_affine(shape: tuple[int, int, int], case: int) -> np.ndarray:
    """The affine (voxel -> RAS mm) of case ``case`` of ``write_dicom_archive``: the phantom
    affine, rotated about the volume centre for the oblique cases (``case % 3 == 1``)."""
    affine = phantom_affine(shape)
    if case % 3 != 1:
        return affine
    ax, ay = np.radians(12.0), np.radians(5.0)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rotated = np.eye(4)
    rotated[:3, :3] = rx @ ry @ affine[:3, :3]
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    rotated[:3, 3] = centre - rotated[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return rotated


def _t1_decoy(flair: np.ndarray) -> np.ndarray:
    """A T1-looking series on the same grid: the FLAIR contrast inverted inside the brain."""
    brain = flair > 0
    top = int(flair.max()) + 1
    return np.where(brain, (top - flair.astype(np.int32)) // 2 + 1, 0).astype(np.int16)


def write_dicom_archive(out_dir: str | os.PathLike[str], cases: int, *, seed: int = 0,
                        shape: tuple[int, int, int] = (240, 240, 155),
                        config: SynthConfig | None = None, progress: bool = False) -> Path:
    """Write ``cases`` phantoms as DICOM studies (see the module docstring) under
    ``out_dir``; returns ``out_dir``. Needs the ``[dicom]`` extra (pydicom)."""
    from pydicom.uid import generate_uid

    from ubc.io.dicom_write import SeriesSpec, write_series

    root = Path(out_dir)

    def write(i: int, name: str, flair: np.ndarray, _seg: np.ndarray, grade: int) -> _Row:
        def uid(*what: str) -> str:
            return str(generate_uid(entropy_srcs=["ubc-synth", str(seed), str(i), *what]))

        study, frame = uid("study"), uid("frame")
        affine = dicom_affine(flair.shape, i)
        top_down = list(range(flair.shape[2]))[::-1]
        write_series(flair, affine, root / name / "1_FLAIR",
                     SeriesSpec(study, uid("flair"), frame, description="AX T2 FLAIR",
                                series_number=1, patient_id=name),
                     multiframe=i % 3 == 2, names="IM{:04d}", order=top_down)
        write_series(_t1_decoy(flair), affine, root / name / "2_T1",
                     SeriesSpec(study, uid("t1"), frame, description="AX T1 SE",
                                series_number=2, patient_id=name, scanning_sequence="SE",
                                inversion_time_ms=None, echo_time_ms=12.0,
                                repetition_time_ms=500.0, echo_train_length=1,
                                contrast="T1", pulse_sequence_name="se2d"),
                     multiframe=i % 3 == 2)
        return (study, GRADES[grade], name)

    rows = _each_phantom(cases, seed, shape, config, progress, "study", write)
    _write_labels(root, ["case_id", "grade", "patient_id"], rows)
    _write_marker(root, "dicom", cases, seed, shape, config)
    return root
