"""Training and evaluation data: archives of FLAIR volumes with lesion masks and grades.

Cases come from ``ubc.scoring.discover_cases``, the discovery scoring uses too: BraTS 2019
(``ROOT/HGG/<case>/<case>_flair.nii.gz`` + ``_seg``; the grade is the folder), BraTS
2020/2021/2023 (``ROOT/<case>/<case>_flair.nii.gz`` or ``-t2f``, grades from a CSV), or a CSV
manifest ``case_id,image,mask,label``.

Every case is read by its reader (``ubc.io.readers``: NIfTI, NRRD, a DICOM series) and
preprocessed by ``ubc.preprocess``, the code that scoring runs: there is no train/serve
skew. The paper's protocol picks, per case,
the ``top_k`` axial slices with the largest lesion area (ground-truth mask).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ubc.bundle import Preprocessing
from ubc.errors import UBCInputError
from ubc.scoring.aggregate import top_slices
from ubc.scoring.discover import GRADES, Case, discover_cases

if TYPE_CHECKING:
    from ubc.provenance import TrainingData

__all__ = ["GRADES", "Case", "CaseSlices", "SliceSet", "case_slices", "discover", "load_cases",
           "load_lesion_free", "case_spacing", "CALIBRATION_ENDS", "training_data",
           "split_cases", "subsample", "sample_slices"]

UNLABELLED = -1
#: Share of a case's non-lesion INT8 calibration slices drawn from the brain's ends. Parity
#: slices take none: a border slice's P(HGG) can sit at 0.5, where any rounding flips its
#: class (on the 224 px bundle one such slice failed OpenVINO bf16's 1 % flip gate).
CALIBRATION_ENDS = 0.5
# BraTS codes of the sub-region masks (``mask_channels=3``): necrotic / non-enhancing core,
# enhancing rim, oedema. The union mask (one channel) is the paper's target.
SUBREGION_CODES = (1, 4, 2)
LESION_FREE_SUFFIX = "#lesion-free"  # pseudo-case of a patient's lesion-free slices


@dataclass(frozen=True)
class CaseSlices:
    """Preprocessed slices of one case: ``images`` float32 [K, 1, H, W], ``masks`` uint8
    [K, 1, H, W] (None without a mask), the axial ``slice_indices`` [K] (canonical RAS z) and
    their lesion ``areas_mm2`` [K] (0 without a mask)."""

    case_id: str
    label: int | None
    images: np.ndarray
    masks: np.ndarray | None
    slice_indices: np.ndarray
    areas_mm2: np.ndarray


@dataclass(frozen=True)
class SliceSet:
    """Slices of many cases stacked for training: ``images`` float32 [N, 1, H, W], ``masks``
    uint8 [N, 1, H, W] (zeros where ``has_mask`` is False), ``labels`` int64 [N] (-1 =
    unknown grade), ``has_mask`` bool [N], ``patient`` int64 [N] indexing ``case_ids``."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    has_mask: np.ndarray
    patient: np.ndarray
    case_ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray | Sequence[int]) -> SliceSet:
        """A subset of rows (patients keep their ids)."""
        rows = np.asarray(rows, dtype=np.int64)
        return SliceSet(self.images[rows], self.masks[rows], self.labels[rows],
                        self.has_mask[rows], self.patient[rows], self.case_ids)

    def summary(self) -> dict[str, int]:
        """Counts for meta.json: slices, patients, per class, with masks, unlabelled."""
        patients = {self.case_ids[p].removesuffix(LESION_FREE_SUFFIX)
                    for p in np.unique(self.patient)}
        return {"slices": len(self), "patients": len(patients),
                **{f"slices_{g}": int((self.labels == i).sum()) for i, g in enumerate(GRADES)},
                "slices_with_mask": int(self.has_mask.sum()),
                "slices_unlabelled": int((self.labels == UNLABELLED).sum())}


def discover(path: str | os.PathLike[str], *, labels: str | os.PathLike[str] | None = None
             ) -> list[Case]:
    """The cases of a training archive, sorted by id: ``ubc.scoring.discover_cases`` (the
    one discovery, grades included) with the training precondition that there are some."""
    cases = discover_cases(path, labels=labels)
    if not cases:
        raise UBCInputError(f"{path}: no cases found (expected HGG/<case>/<case>_flair.nii.gz, "
                            "<case>/<case>_flair.nii.gz with a grade CSV, or a manifest CSV)")
    return sorted(cases, key=lambda c: c.case_id)


def _header_spacing(path: Path) -> tuple[float, float, float] | None:
    """Canonical RAS voxel size from a NIfTI file's header alone; None when nibabel cannot
    read it as NIfTI or its affine has no orientation (the loader then says what is wrong)."""
    import nibabel as nib

    from ubc.io.volume import orientation_of

    try:
        header = nib.load(path).header
    except Exception:  # nibabel raises many kinds for a broken file
        return None
    if not isinstance(header, nib.Nifti1Header):
        return None
    ornt = orientation_of(np.asarray(header.get_best_affine(), dtype=np.float64))
    if ornt is None:
        return None
    zooms, spacing = header.get_zooms(), [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        spacing[int(target)] = float(zooms[axis])
    return spacing[0], spacing[1], spacing[2]


def case_spacing(case: Case) -> tuple[float, float, float]:
    """The voxel size (x, y, z) in mm of ``case``'s image in canonical RAS, as scoring sees
    it: from the header alone for NIfTI, else (or for a file the header does not settle)
    from the loaded volume; ``UBCInputError`` naming the file when it cannot be read."""
    from ubc.io.readers import NiftiFile

    spacing = _header_spacing(case.reader.path) if isinstance(case.reader, NiftiFile) else None
    return spacing or case.reader.load().spacing


def _archive_source(source: Path, cases: Sequence[Case]) -> str:
    """What kind of training archive ``source`` is (``ubc.provenance.SOURCES``)."""
    from ubc.provenance import BRATS, FOLDER, MANIFEST, SYNTH_MARKER, SYNTHETIC

    if source.is_file() and source.suffix.lower() == ".zip":
        from ubc.scoring.archive_zip import extract_zip

        source = extract_zip(source)  # the folder discovery extracted it to (cached)
    if source.is_file():
        return MANIFEST
    if (source / SYNTH_MARKER).is_file():
        return SYNTHETIC
    if cases and all(c.image.parent.name == c.case_id for c in cases):
        return BRATS  # every id is its image's folder: <case>/<case>_flair.nii.gz
    return FOLDER


def training_data(source: str | os.PathLike[str], cases: Sequence[Case]) -> TrainingData:
    """The record of what a model is trained on (``ubc.provenance``): the kind and name of
    the archive ``source``, the ``cases`` per grade and their spacing range (headers
    read, NIfTI voxels not)."""
    from ubc.io.conformance import TrainedSpacing
    from ubc.provenance import TrainingData

    if not cases:
        raise ValueError("no training cases")
    spacings = np.array([case_spacing(c) for c in cases], dtype=np.float64)
    inplane, thickness = spacings[:, :2], spacings[:, 2]

    def span(values: np.ndarray) -> tuple[float, float]:
        return round(float(values.min()), 4), round(float(values.max()), 4)

    counts = tuple((grade, sum(c.label == i for c in cases)) for i, grade in enumerate(GRADES))
    unlabelled = sum(c.label is None for c in cases)
    return TrainingData(_archive_source(Path(source), cases), Path(source).name,
                        counts + ((("unlabelled", unlabelled),) if unlabelled else ()),
                        TrainedSpacing(span(inplane), span(thickness)))


def _read(case: Case) -> tuple[Any, Any]:
    """(image Volume, mask Volume or None), both canonical RAS, same grid."""
    from ubc.io.readers import reader_for_file

    volume = case.reader.load()
    seg = None
    if case.mask is not None:
        seg = reader_for_file(case.mask).load()
        if seg.data.shape != volume.data.shape:
            raise UBCInputError(f"{case.mask}: mask shape {seg.data.shape} does not match "
                                f"image {case.image} {volume.data.shape}")
    return volume, seg


def _choose(case: Case, volume: Any, seg: Any, top_k: int | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(chosen slice indices, lesion area in mm2 of every slice)."""
    from ubc import preprocess

    n_slices = volume.data.shape[2]
    areas = preprocess.lesion_areas(seg.data, seg.spacing) if seg is not None \
        else np.zeros(n_slices)
    if top_k is None:
        return np.arange(n_slices), areas
    if seg is None:
        return top_slices(preprocess.foreground_counts(volume.data).astype(float), top_k), areas
    chosen = top_slices(areas, top_k)
    if len(chosen) == 0:
        raise UBCInputError(f"{case.mask}: empty lesion mask; give the case no mask "
                            "(label only) or fix the segmentation")
    return chosen, areas


def _preprocessed(case: Case, volume: Any, seg: Any, chosen: np.ndarray,
                  preprocessing: Preprocessing, mask_channels: int = 1
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    from ubc import preprocess

    size, spacing = preprocessing.size, preprocessing.target_spacing
    try:
        images = preprocess.slices(volume.data, volume.spacing, size=size, target_spacing=spacing,
                                   norm=preprocessing.norm, slice_indices=chosen)
    except ValueError as exc:
        raise UBCInputError(f"{case.image}: cannot preprocess ({exc})") from exc
    masks = None
    if seg is not None:
        codes = [None] if mask_channels == 1 else SUBREGION_CODES
        masks = np.concatenate([preprocess.mask_slices(
            seg.data if code is None else (seg.data == code).astype(np.uint8), seg.spacing,
            size=size, target_spacing=spacing, slice_indices=chosen) for code in codes], axis=1)
    return images, masks


def case_slices(case: Case, preprocessing: Preprocessing, *, top_k: int | None = 5,
                mask_channels: int = 1) -> CaseSlices:
    """Load and preprocess one case: the ``top_k`` slices with the largest lesion area
    (``top_k=None``: every axial slice). A case without a mask gets the ``top_k`` slices with
    the most brain (foreground) instead. ``mask_channels=3``: the masks are the sub-regions
    of ``SUBREGION_CODES`` (core, rim, oedema), else the union. Raises UBCInputError naming
    the file."""
    if mask_channels not in (1, len(SUBREGION_CODES)):
        raise ValueError(f"mask_channels must be 1 (union) or 3 (sub-regions), got {mask_channels}")
    volume, seg = _read(case)
    chosen, areas = _choose(case, volume, seg, top_k)
    images, masks = _preprocessed(case, volume, seg, chosen, preprocessing, mask_channels)
    return CaseSlices(case.case_id, case.label, images, masks, chosen, areas[chosen])


def load_lesion_free(case: Case, preprocessing: Preprocessing, n: int, *,
                     mask_channels: int = 1) -> CaseSlices | None:
    """Up to ``n`` brain slices of ``case`` with an empty lesion mask, evenly spaced along z,
    as a mask-only pseudo-case (id ``<case>#lesion-free``, no grade; summaries count it as
    the same patient). Trained on, they teach
    the segmenter that lesion-free brain is not lesion: scoring ranks every slice of a volume
    by predicted lesion area, so it must see such slices too. None without a mask or such
    slices. Slices with under 5% of the fullest slice's brain are not used (skull caps)."""
    from ubc import preprocess

    volume, seg = _read(case)
    if seg is None or n < 1:
        return None
    areas = preprocess.lesion_areas(seg.data, seg.spacing)
    brain = preprocess.foreground_counts(volume.data)
    candidates = np.flatnonzero((areas == 0) & (brain > 0.05 * brain.max()))
    if len(candidates) == 0:
        return None
    picks = np.linspace(0, len(candidates) - 1, min(n, len(candidates))).round().astype(int)
    chosen = candidates[picks]
    images, masks = _preprocessed(case, volume, seg, chosen, preprocessing, mask_channels)
    return CaseSlices(case.case_id + LESION_FREE_SUFFIX, None, images, masks, chosen,
                      areas[chosen])


def load_cases(cases: Iterable[Case], preprocessing: Preprocessing, *, top_k: int | None = 5,
               lesion_free: int = 0, mask_channels: int = 1, progress: bool = True
               ) -> SliceSet:
    """``case_slices`` for every case, stacked into one ``SliceSet``; with ``lesion_free`` > 0
    also ``load_lesion_free`` pseudo-cases (mask-only rows)."""
    from tqdm import tqdm

    loaded: list[CaseSlices] = []
    for case in tqdm(list(cases), desc="loading", unit="case", disable=not progress):
        loaded.append(case_slices(case, preprocessing, top_k=top_k, mask_channels=mask_channels))
        negatives = load_lesion_free(case, preprocessing, lesion_free,
                                     mask_channels=mask_channels) if lesion_free else None
        if negatives is not None:
            loaded.append(negatives)
    return stack(loaded)


def stack(loaded: Sequence[CaseSlices]) -> SliceSet:
    """Stack ``CaseSlices`` into a ``SliceSet`` (patient ``i`` is ``loaded[i]``)."""
    if not loaded:
        raise ValueError("no cases to stack")
    images = np.concatenate([c.images for c in loaded])
    channels = next((c.masks.shape[1] for c in loaded if c.masks is not None), 1)
    masks = np.concatenate([c.masks if c.masks is not None else np.zeros(
        (len(c.images), channels, *c.images.shape[2:]), np.uint8) for c in loaded])
    counts = [len(c.images) for c in loaded]
    labels = np.repeat([UNLABELLED if c.label is None else c.label for c in loaded], counts)
    has_mask = np.repeat([c.masks is not None for c in loaded], counts)
    patient = np.repeat(np.arange(len(loaded)), counts)
    return SliceSet(images, masks, labels.astype(np.int64), has_mask.astype(bool),
                    patient.astype(np.int64), tuple(c.case_id for c in loaded))


def split_cases(cases: Sequence[Case], *, test_fraction: float = 0.5, seed: int = 0
                ) -> tuple[list[Case], list[Case]]:
    """Patient-level split, stratified by grade: (train, test). Unlabelled cases (mask-only)
    all go to train: they cannot be scored."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: list[Case] = [c for c in cases if c.label is None]
    test: list[Case] = []
    for grade in range(len(GRADES)):
        group = [c for c in cases if c.label == grade]
        order = rng.permutation(len(group))
        n_test = int(round(len(group) * test_fraction))
        test += [group[i] for i in order[:n_test]]
        train += [group[i] for i in order[n_test:]]
    return (sorted(train, key=lambda c: c.case_id), sorted(test, key=lambda c: c.case_id))


def subsample(data: SliceSet, per_class: int, *, seed: int = 0) -> SliceSet:
    """The paper's sweep: ``per_class`` labelled slices per grade, spread over patients.

    Up to one slice per patient (``per_class`` <= patients of that grade), random patients
    and a random one of their slices; beyond that ``ceil(per_class / patients)`` slices per
    patient (76 = 2 per patient and 190 = 5 per patient with 38 patients of 5 slices).
    Unlabelled (mask-only) slices are kept as they are.
    """
    rng = np.random.default_rng(seed)
    rows: list[int] = list(np.flatnonzero(data.labels == UNLABELLED))
    for grade in range(len(GRADES)):
        patients = np.unique(data.patient[data.labels == grade])
        available = int((data.labels == grade).sum())
        if per_class > available:
            raise ValueError(f"per_class={per_class} but only {available} {GRADES[grade]} "
                             "slices are available")
        per_patient = -(-per_class // len(patients))
        chosen: list[int] = []
        for p in rng.permutation(patients):
            own = np.flatnonzero((data.patient == p) & (data.labels == grade))
            chosen += list(rng.permutation(own)[:per_patient])
        rows += chosen[:per_class]
    return data.take(np.sort(np.asarray(rows, dtype=np.int64)))


def sample_slices(archive: str | os.PathLike[str] | Sequence[Case],
                  preprocessing: Preprocessing, n: int, *, seed: int = 0,
                  lesion_fraction: float = 0.5, end_fraction: float = 0.0) -> np.ndarray:
    """float32 [n, 1, H, W] preprocessed slices for parity and INT8 calibration: per case,
    about ``lesion_fraction`` from the largest-lesion slices, ``end_fraction`` of the rest
    from the brain's ends (the slices with the least brain, which calibration should see:
    ``CALIBRATION_ENDS``), the others random brain slices; cases in a seeded random order
    (as few as ``n`` needs)."""
    from ubc import preprocess

    cases = discover(archive) if isinstance(archive, (str, os.PathLike)) else list(archive)
    if n < 1 or not cases:
        raise ValueError(f"need n >= 1 and at least one case, got n={n}, {len(cases)} cases")
    rng = np.random.default_rng(seed)
    per_case = max(1, -(-n // len(cases)))
    out: list[np.ndarray] = []
    for i in rng.permutation(len(cases)):
        volume, seg = _read(cases[i])
        n_lesion = int(round(per_case * lesion_fraction)) if seg is not None else 0
        picks = list(top_slices(_choose(cases[i], volume, seg, None)[1], n_lesion))
        counts = preprocess.foreground_counts(volume.data)
        brain = np.setdiff1d(np.flatnonzero(counts > 0), picks)
        ends = brain[np.argsort(counts[brain], kind="stable")[
            :int((per_case - len(picks)) * end_fraction)]]
        rest = np.setdiff1d(brain, ends)
        picks += [*ends, *rng.choice(rest, size=min(per_case - len(picks) - len(ends),
                                                    len(rest)), replace=False)]
        out.append(_preprocessed(cases[i], volume, None, np.asarray(picks, np.int64),
                                 preprocessing)[0])
        if sum(len(o) for o in out) >= n:
            break
    return np.ascontiguousarray(np.concatenate(out)[:n])
