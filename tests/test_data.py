"""Archive readers, the paper's top-5 protocol, the patient-level split, the sweep's
subsamples and calibration slices."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from ubc import preprocess
from ubc.bundle import Preprocessing
from ubc.data import (
    Case,
    SliceSet,
    case_slices,
    discover,
    load_cases,
    load_lesion_free,
    sample_slices,
    split_cases,
    subsample,
)
from ubc.errors import UBCInputError
from ubc.io import load_volume
from ubc.scoring.aggregate import top_slices

PREP = Preprocessing(size=(64, 64), target_spacing=(1.0, 1.0))


def test_brats2019_layout(phantom_archive: Path) -> None:
    cases = discover(phantom_archive)
    assert len(cases) == 6
    assert sorted(c.label for c in cases) == [0, 0, 0, 1, 1, 1]
    for case in cases:
        assert case.image.name == f"{case.case_id}_flair.nii.gz"
        assert case.mask is not None and case.mask.name == f"{case.case_id}_seg.nii.gz"
        assert case.image.parent.parent.name == ("LGG", "HGG")[case.label]


def test_brats2020_layout_takes_grades_from_a_csv(phantom_archive: Path,
                                                  tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    truth = {}
    for case in discover(phantom_archive):
        shutil.copytree(case.image.parent, flat / case.case_id)
        truth[case.case_id] = case.label
    with open(flat / "name_mapping.csv", "w", newline="") as f:  # BraTS 2020's file
        writer = csv.writer(f)
        writer.writerow(["Grade", "BraTS_2019_subject_ID", "BraTS_2020_subject_ID"])
        for case_id, label in truth.items():
            writer.writerow([("LGG", "HGG")[label], "", case_id])
    assert {c.case_id: c.label for c in discover(flat)} == truth
    (flat / "name_mapping.csv").unlink()
    assert all(c.label is None for c in discover(flat))  # no CSV: grades unknown


def test_manifest_with_missing_masks_and_labels(phantom_archive: Path,
                                                tmp_path: Path) -> None:
    cases = discover(phantom_archive)
    manifest = tmp_path / "cases.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "image", "mask", "label"])
        writer.writerow(["a", cases[0].image, cases[0].mask, "HGG"])
        writer.writerow(["b", cases[1].image, "", "LGG"])
        writer.writerow(["c", cases[2].image, cases[2].mask, ""])
    got = {c.case_id: c for c in discover(manifest)}
    assert got["a"].label == 1 and got["a"].mask == cases[0].mask
    assert got["b"].label == 0 and got["b"].mask is None
    assert got["c"].label is None
    # the mask-less case gets the slices with the most brain
    loaded = case_slices(got["b"], PREP, top_k=3)
    assert loaded.masks is None and loaded.images.shape == (3, 1, 64, 64)
    counts = preprocess.foreground_counts(load_volume(cases[1].image).data)
    assert set(loaded.slice_indices) == set(np.argsort(-counts, kind="stable")[:3])


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,image,label\nx,x.nii.gz,GBM4\n")
    with pytest.raises(UBCInputError, match="bad.csv line 2"):
        discover(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UBCInputError, match="no cases found"):
        discover(tmp_path / "empty")
    with pytest.raises(UBCInputError, match="missing"):
        case_slices(Case("x", tmp_path / "missing.nii.gz"), PREP)


def test_load_case_takes_the_largest_lesion_slices(phantom_archive: Path) -> None:
    case = discover(phantom_archive)[0]
    loaded = case_slices(case, PREP)
    seg = load_volume(case.mask)
    areas = (seg.data > 0).sum(axis=(0, 1)).astype(float)  # 1 mm voxels: mm2
    assert loaded.images.shape == loaded.masks.shape == (5, 1, 64, 64)
    assert loaded.images.dtype == np.float32 and loaded.masks.dtype == np.uint8
    assert np.array_equal(loaded.areas_mm2, np.sort(areas)[::-1][:5])
    assert np.array_equal(loaded.areas_mm2, areas[loaded.slice_indices])
    for row, k in enumerate(loaded.slice_indices):  # same code path as scoring
        volume = load_volume(case.image)
        expected = preprocess.slices(volume.data, volume.spacing, size=(64, 64),
                                     slice_indices=[k])
        assert np.array_equal(loaded.images[row], expected[0])
        assert loaded.masks[row].sum() > 0


def test_top_slices_order_ties_and_zeros() -> None:
    areas = np.array([0.0, 5.0, 3.0, 5.0, 0.0, 1.0])
    assert top_slices(areas, 3).tolist() == [1, 3, 2]
    assert top_slices(areas, 10).tolist() == [1, 3, 2, 5]  # empty slices never chosen


def _cases(n_lgg: int, n_hgg: int, n_unlabelled: int = 0) -> list[Case]:
    labels = [0] * n_lgg + [1] * n_hgg + [None] * n_unlabelled
    return [Case(f"c{i:03d}", Path(f"c{i}.nii.gz"), None, y) for i, y in enumerate(labels)]


@pytest.mark.parametrize(("n_lgg", "n_hgg"), [(76, 76), (76, 259), (5, 7)])
def test_split_is_patient_level_stratified_and_seeded(n_lgg: int, n_hgg: int) -> None:
    cases = _cases(n_lgg, n_hgg, n_unlabelled=3)
    train, test = split_cases(cases, seed=4)
    assert not {c.case_id for c in train} & {c.case_id for c in test}
    assert len(train) + len(test) == len(cases)
    for grade, n in ((0, n_lgg), (1, n_hgg)):
        assert abs(sum(c.label == grade for c in test) - n / 2) <= 0.5
    assert all(c.label is not None for c in test)  # unlabelled cases cannot be scored
    assert split_cases(cases, seed=4) == (train, test)
    assert split_cases(cases, seed=5) != (train, test)


def _slice_set(patients_per_class: int, per_patient: int = 5) -> SliceSet:
    n = 2 * patients_per_class * per_patient
    patient = np.repeat(np.arange(2 * patients_per_class), per_patient)
    labels = (patient >= patients_per_class).astype(np.int64)
    return SliceSet(np.zeros((n, 1, 32, 32), np.float32), np.zeros((n, 1, 32, 32), np.uint8),
                    labels, np.ones(n, bool), patient,
                    tuple(f"p{i}" for i in range(2 * patients_per_class)))


@pytest.mark.parametrize(("per_class", "per_patient"),
                         [(1, 1), (5, 1), (19, 1), (38, 1), (76, 2), (190, 5)])
def test_subsample_follows_the_papers_sweep(per_class: int, per_patient: int) -> None:
    data = _slice_set(38)
    sub = subsample(data, per_class, seed=1)
    for grade in (0, 1):
        rows = sub.labels == grade
        assert rows.sum() == per_class
        _, counts = np.unique(sub.patient[rows], return_counts=True)
        assert counts.max() == per_patient
    with pytest.raises(ValueError, match="only 190"):
        subsample(data, 191)


def test_load_cases_and_sample_slices(phantom_archive: Path) -> None:
    cases = discover(phantom_archive)
    data = load_cases(cases[:2], PREP, progress=False)
    assert len(data) == 10 and data.summary()["patients"] == 2
    assert data.case_ids == tuple(c.case_id for c in cases[:2])
    calib = sample_slices(phantom_archive, PREP, 9, seed=1)
    assert calib.shape == (9, 1, 64, 64) and calib.dtype == np.float32
    assert np.isfinite(calib).all() and (np.abs(calib).sum(axis=(1, 2, 3)) > 0).all()
    assert np.array_equal(calib, sample_slices(phantom_archive, PREP, 9, seed=1))


def test_lesion_free_slices_are_mask_only_rows_of_healthy_brain(phantom_archive: Path) -> None:
    case = discover(phantom_archive)[0]
    extra = load_lesion_free(case, PREP, 4)
    assert extra is not None and extra.label is None and extra.masks is not None
    assert extra.case_id == f"{case.case_id}#lesion-free" and len(extra.images) == 4
    seg, flair = load_volume(case.mask), load_volume(case.image)
    assert (preprocess.lesion_areas(seg.data, seg.spacing)[extra.slice_indices] == 0).all()
    assert (preprocess.foreground_counts(flair.data)[extra.slice_indices] > 0).all()
    assert not extra.masks.any() and (np.abs(extra.images).sum(axis=(1, 2, 3)) > 0).all()
    data = load_cases([case], PREP, lesion_free=4, progress=False)
    assert len(data) == 5 + 4
    assert (data.labels[5:] == -1).all() and data.has_mask.all()
    assert (data.labels[:5] == case.label).all()
