"""Training and evaluation data: archives of FLAIR volumes with lesion masks and grades.

Readers (``discover``):
- BraTS 2019 layout: ``ROOT/HGG/<case>/<case>_flair.nii.gz`` (+ ``_seg``), same for LGG;
  the grade is the folder.
- BraTS 2020/2021/2023 layout: ``ROOT/<case>/<case>_flair.nii.gz`` (2023: ``-t2f``,
  ``-seg``); the grade comes from a CSV (``labels=``, or ``labels.csv`` /
  ``name_mapping.csv`` in ROOT) with a case column and a ``grade`` column (HGG/LGG).
- A CSV manifest ``case_id,image,mask,label`` (``mask`` and ``label`` may be empty; relative
  paths are relative to the CSV).

Every case is read by ``ubc.io.load_volume`` and preprocessed by ``ubc.preprocess``, the
code that scoring runs: there is no train/serve skew. The paper's protocol picks, per case,
the ``top_k`` axial slices with the largest lesion area (ground-truth mask).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ubc.bundle import Preprocessing
from ubc.errors import UBCInputError

__all__ = ["GRADES", "Case", "CaseSlices", "SliceSet", "discover", "load_case", "load_cases",
           "load_lesion_free",
           "split_cases", "subsample", "sample_slices", "top_slices"]

GRADES = ("LGG", "HGG")  # class index 0, 1 (the bundle's class_names)
UNLABELLED = -1
LESION_FREE_SUFFIX = "#lesion-free"  # pseudo-case of a patient's lesion-free slices
_IMAGE_SUFFIXES = ("_flair.nii.gz", "_flair.nii", "-t2f.nii.gz", "-t2f.nii")
_MASK_SUFFIXES = ("_seg.nii.gz", "_seg.nii", "-seg.nii.gz", "-seg.nii")
_LABEL_CSVS = ("labels.csv", "name_mapping.csv")


@dataclass(frozen=True)
class Case:
    """One patient: FLAIR path, optional lesion-mask path, grade 0 (LGG) / 1 (HGG) / None."""

    case_id: str
    image: Path
    mask: Path | None = None
    label: int | None = None


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


def _grade(value: str, where: str) -> int | None:
    text = value.strip().upper()
    if text in ("", "NA", "NAN", "NONE", "UNKNOWN", "?"):
        return None
    if text in ("LGG", "0"):
        return 0
    if text in ("HGG", "GBM", "1"):
        return 1
    raise UBCInputError(f"{where}: grade {value!r} is neither LGG/0 nor HGG/1 (or empty)")


def _find(folder: Path, suffixes: Sequence[str]) -> Path | None:
    for suffix in suffixes:
        hits = sorted(folder.glob(f"*{suffix}"))
        if hits:
            return hits[0]
    return None


def _case_from_folder(folder: Path, label: int | None) -> Case | None:
    image = _find(folder, _IMAGE_SUFFIXES)
    if image is None:
        return None
    return Case(folder.name, image, _find(folder, _MASK_SUFFIXES), label)


def _read_grades(path: Path) -> dict[str, int | None]:
    """case id -> grade from a CSV with a grade column and any case-id column(s)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not any(k.strip().lower() == "grade" for k in rows[0]):
        raise UBCInputError(f"{path}: needs a 'grade' column (HGG/LGG) and a case id column")
    grades: dict[str, int | None] = {}
    for n, row in enumerate(rows, start=2):
        grade_key = next(k for k in row if k.strip().lower() == "grade")
        grade = _grade(row[grade_key] or "", f"{path} line {n}")
        for key, value in row.items():  # name_mapping.csv has one id column per BraTS year
            if key != grade_key and value:
                grades[value.strip()] = grade
    return grades


def _read_manifest(path: Path) -> list[Case]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"case_id", "image"} - set(reader.fieldnames or ())
        if missing:
            raise UBCInputError(f"{path}: manifest needs columns case_id,image[,mask,label]; "
                                f"missing {', '.join(sorted(missing))}")
        rows = list(reader)
    cases = []
    for n, row in enumerate(rows, start=2):
        mask = (row.get("mask") or "").strip()
        cases.append(Case(row["case_id"].strip(), path.parent / row["image"].strip(),
                          path.parent / mask if mask else None,
                          _grade(row.get("label") or "", f"{path} line {n}")))
    return cases


def discover(path: str | os.PathLike[str], *, labels: str | os.PathLike[str] | None = None
             ) -> list[Case]:
    """Cases of an archive (BraTS 2019 / 2020+ layout, or a CSV manifest), sorted by id.

    ``labels`` is a grade CSV for layouts without HGG/LGG folders. Raises UBCInputError
    naming the path when nothing usable is found.
    """
    root = Path(path)
    if root.is_file() and root.suffix.lower() == ".csv":
        cases = _read_manifest(root)
    elif root.is_dir():
        cases = _discover_folder(root, Path(labels) if labels else None)
    else:
        raise UBCInputError(f"{root}: not a folder or a .csv manifest")
    if not cases:
        raise UBCInputError(f"{root}: no cases found (expected HGG/<case>/<case>_flair.nii.gz, "
                            "<case>/<case>_flair.nii.gz with a grade CSV, or a manifest CSV)")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UBCInputError(f"{root}: duplicate case ids {', '.join(duplicates[:5])}")
    return sorted(cases, key=lambda c: c.case_id)


def _discover_folder(root: Path, labels: Path | None) -> list[Case]:
    graded = [g for g in GRADES if (root / g).is_dir()]
    if graded:
        return [case for g in graded for folder in sorted((root / g).iterdir())
                if folder.is_dir()
                and (case := _case_from_folder(folder, GRADES.index(g))) is not None]
    if labels is None:
        labels = next((root / n for n in _LABEL_CSVS if (root / n).is_file()), None)
    grades = _read_grades(labels) if labels else {}
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        case = _case_from_folder(folder, grades.get(folder.name))
        if case is not None:
            cases.append(case)
    return cases


def top_slices(areas_mm2: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest non-zero areas, largest first (ties: lower index first)."""
    order = np.lexsort((np.arange(len(areas_mm2)), -np.asarray(areas_mm2)))
    return order[:k][np.asarray(areas_mm2)[order[:k]] > 0]


def _read(case: Case) -> tuple[Any, Any]:
    """(image Volume, mask Volume or None), both canonical RAS, same grid."""
    from ubc.io import load_volume

    volume = load_volume(case.image)
    seg = None
    if case.mask is not None:
        seg = load_volume(case.mask)
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
                  preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray | None]:
    from ubc import preprocess

    size, spacing = preprocessing.size, preprocessing.target_spacing
    try:
        images = preprocess.slices(volume.data, volume.spacing, size=size, target_spacing=spacing,
                                   norm=preprocessing.norm, slice_indices=chosen)
    except ValueError as exc:
        raise UBCInputError(f"{case.image}: cannot preprocess ({exc})") from exc
    masks = None
    if seg is not None:
        masks = preprocess.mask_slices(seg.data, seg.spacing, size=size, target_spacing=spacing,
                                       slice_indices=chosen)
    return images, masks


def load_case(case: Case, preprocessing: Preprocessing, *, top_k: int | None = 5
              ) -> CaseSlices:
    """Load and preprocess one case: the ``top_k`` slices with the largest lesion area
    (``top_k=None``: every axial slice). A case without a mask gets the ``top_k`` slices with
    the most brain (foreground) instead. Raises UBCInputError naming the file."""
    volume, seg = _read(case)
    chosen, areas = _choose(case, volume, seg, top_k)
    images, masks = _preprocessed(case, volume, seg, chosen, preprocessing)
    return CaseSlices(case.case_id, case.label, images, masks, chosen, areas[chosen])


def load_lesion_free(case: Case, preprocessing: Preprocessing, n: int) -> CaseSlices | None:
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
    images, masks = _preprocessed(case, volume, seg, chosen, preprocessing)
    return CaseSlices(case.case_id + LESION_FREE_SUFFIX, None, images, masks, chosen,
                      areas[chosen])


def load_cases(cases: Iterable[Case], preprocessing: Preprocessing, *, top_k: int | None = 5,
               lesion_free: int = 0, progress: bool = True) -> SliceSet:
    """``load_case`` for every case, stacked into one ``SliceSet``; with ``lesion_free`` > 0
    also ``load_lesion_free`` pseudo-cases (mask-only rows)."""
    from tqdm import tqdm

    loaded: list[CaseSlices] = []
    for case in tqdm(list(cases), desc="loading", unit="case", disable=not progress):
        loaded.append(load_case(case, preprocessing, top_k=top_k))
        negatives = load_lesion_free(case, preprocessing, lesion_free) if lesion_free else None
        if negatives is not None:
            loaded.append(negatives)
    return stack(loaded)


def stack(loaded: Sequence[CaseSlices]) -> SliceSet:
    """Stack ``CaseSlices`` into a ``SliceSet`` (patient ``i`` is ``loaded[i]``)."""
    if not loaded:
        raise ValueError("no cases to stack")
    images = np.concatenate([c.images for c in loaded])
    masks = np.concatenate([c.masks if c.masks is not None else np.zeros_like(c.images,
                            dtype=np.uint8) for c in loaded])
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
                  lesion_fraction: float = 0.5) -> np.ndarray:
    """float32 [n, 1, H, W] preprocessed slices for INT8 calibration: about
    ``lesion_fraction`` from the largest-lesion slices, the rest random brain slices, drawn
    from cases in a seeded random order (as few cases as ``n`` needs)."""
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
        brain = np.setdiff1d(np.flatnonzero(preprocess.foreground_counts(volume.data) > 0),
                             picks)
        picks += list(rng.choice(brain, size=min(per_case - len(picks), len(brain)),
                                 replace=False))
        out.append(_preprocessed(cases[i], volume, None, np.asarray(picks, np.int64),
                                 preprocessing)[0])
        if sum(len(o) for o in out) >= n:
            break
    return np.ascontiguousarray(np.concatenate(out)[:n])
