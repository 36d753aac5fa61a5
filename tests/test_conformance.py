"""Conformance checks (issue 12): inputs the model was not trained for are flagged or refused
with the fix, on the real volumes and on generated edge cases, and in the rows of a run."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import copy_bundle
from scoring_archive import FakeEngine, record_training_data

from ubc.errors import UBCInputError
from ubc.io import Volume, load_volume
from ubc.io.conformance import (
    SKULL_FIX,
    Thresholds,
    TrainedSpacing,
    check_output,
    check_volume,
)
from ubc.synth import phantom


def _phantom_volume(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
                    affine: np.ndarray | None = None) -> Volume:
    data = phantom(11, grade=1, shape=(64, 64, 24))[0]
    affine = np.diag([*spacing, 1.0]) if affine is None else affine
    return Volume(data, spacing, affine, affine, data.shape)


def _with(volume: Volume, data: np.ndarray) -> Volume:
    return dataclasses.replace(volume, data=data)


@pytest.mark.real
def test_real_volumes_pass_without_flags(real_volume_paths: dict[str, Path]) -> None:
    for role in ("brats_flair", "tcga_flair"):
        volume = load_volume(real_volume_paths[role])
        checked = check_volume(volume, target_spacing=(1.0, 1.0))
        assert checked.flags == () and checked.volume is volume  # nothing copied


@pytest.mark.real
def test_z_scored_real_volume_is_shifted_back_and_scores_the_same_slices(
        real_volume_paths: dict[str, Path]) -> None:
    """The issue's z-scored FLAIR (negative background): every voxel was foreground. Now
    the background is found, set to 0, and the model sees the same normalised slices."""
    from ubc import preprocess

    volume = load_volume(real_volume_paths["brats_flair"])
    raw = np.asarray(volume.data, dtype=np.float32)
    brain = raw != 0
    zscored = np.where(brain, (raw - raw[brain].mean()) / raw[brain].std(),
                       -raw[brain].mean() / raw[brain].std()).astype(np.float32)
    checked = check_volume(_with(volume, zscored))
    assert len(checked.flags) == 1 and checked.flags[0].startswith("background_shifted:-")
    fixed = np.asarray(checked.volume.data)
    assert np.array_equal(fixed != 0, brain)
    indices = np.flatnonzero(preprocess.foreground_counts(raw, threads=1))[::10]
    kwargs = dict(size=(224, 224), target_spacing=(1.0, 1.0), slice_indices=indices, threads=1)
    np.testing.assert_allclose(preprocess.slices(fixed, volume.spacing, **kwargs),
                               preprocess.slices(raw, volume.spacing, **kwargs), atol=2e-3)


def test_nibabel_nan_file_non_finite_border_then_no_background() -> None:
    """nibabel's resampled_anat_moved.nii: NaN outside the field of view (border), and a
    head with no zero background: the NaN are not the reason it is refused."""
    from nibabel.testing import data_path

    path = Path(data_path) / "resampled_anat_moved.nii"
    if not path.is_file():
        pytest.skip("nibabel's test data is not installed")
    with pytest.raises(UBCInputError, match="no uniform background") as info:
        check_volume(load_volume(path))
    assert SKULL_FIX in str(info.value) and "NaN" not in str(info.value)


def test_non_finite_voxels_on_the_border_become_background_inside_are_refused() -> None:
    volume = _phantom_volume()
    data = np.asarray(volume.data, dtype=np.float32).copy()
    data[:3] = np.nan
    data[-1, :, :5] = np.inf
    checked = check_volume(_with(volume, data))
    assert checked.flags == (f"nonfinite_background:{3 * 64 * 24 + 64 * 5}",)
    assert np.isfinite(checked.volume.data).all()
    assert np.count_nonzero(checked.volume.data) == np.count_nonzero(volume.data[3:])
    data[32, 32, 12] = np.nan  # inside the brain
    with pytest.raises(UBCInputError, match="1 NaN/Inf voxels inside the head"):
        check_volume(_with(volume, data))


def test_background_rules() -> None:
    volume = _phantom_volume()
    raw = np.asarray(volume.data, dtype=np.float32)
    rng = np.random.default_rng(0)
    noisy = raw + np.abs(rng.normal(0, 20, raw.shape)).astype(np.float32)
    with pytest.raises(UBCInputError, match="no uniform background") as info:
        check_volume(_with(volume, noisy))
    assert "HD-BET or SynthStrip" in str(info.value)
    shifted = np.where(raw != 0, raw - 50, -50).astype(np.float32)
    shifted[10, 10, 10] = -80  # values below the background: cannot tell which is which
    shifted[20:30, 20:30, 2:10] = -90
    with pytest.raises(UBCInputError, match="lie below it"):
        check_volume(_with(volume, shifted))
    with pytest.raises(UBCInputError, match="constant"):
        check_volume(_with(volume, np.full(raw.shape, 7, np.int16)))


def test_a_head_larger_than_any_brain_is_refused() -> None:
    """A phantom with a bright scalp filling the slices, at clinical 0.9 x 0.9 x 5.5 mm."""
    volume = _phantom_volume()
    head = np.asarray(volume.data).copy()
    x, y = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
    head[(x / 31) ** 2 + (y / 31) ** 2 < 1] = np.maximum(
        head[(x / 31) ** 2 + (y / 31) ** 2 < 1], 900)
    spacing = (3.6, 3.6, 5.5)  # 230 mm field of view, 24 slices: a whole head
    big = Volume(head, spacing, np.diag([*spacing, 1.0]), np.diag([*spacing, 1.0]), head.shape)
    with pytest.raises(UBCInputError, match="more than any brain") as info:
        check_volume(big)
    assert SKULL_FIX in str(info.value)
    assert check_volume(dataclasses.replace(big, data=volume.data)).flags  # brain only: ok


def test_geometry_flags_carry_the_numbers() -> None:
    t = Thresholds()
    assert check_volume(_phantom_volume()).flags == ()
    thick = check_volume(_phantom_volume((0.9, 0.9, 5.5)), target_spacing=(1.0, 1.0)).flags
    assert thick == ("thick_slices:5.5mm (trained 1mm)",)
    coarse = check_volume(_phantom_volume((2.0, 2.0, 1.0)), target_spacing=(1.0, 1.0)).flags
    assert coarse == ("inplane_spacing:2x2mm (trained 1x1mm)",)
    sagittal = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)
    assert "non_axial:sagittal slices" in check_volume(_phantom_volume(
        affine=sagittal)).flags
    angle = np.radians(t.oblique_deg + 5)
    tilted = np.eye(4)
    tilted[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    assert check_volume(_phantom_volume(affine=tilted)).flags == ("oblique:15deg",)


def test_implausible_output() -> None:
    assert check_output(1096.0, 1159.0) is not None and "95%" in check_output(1096.0, 1159.0)
    assert check_output(60.0, 1200.0) is None
    assert check_output(700.0, 1200.0, Thresholds(max_lesion_share=0.9)) is None


def test_rows_of_a_run_carry_flags_and_refusals(phantom_archive: Path, tiny_bundle: Path,
                                                tmp_path: Path) -> None:
    """An archive with a z-scored, a thick-sliced and a noisy (not skull-stripped) copy of a
    phantom: flags in the rows; the noisy one is an error row with the fix; an engine that
    calls every voxel lesion gives implausible rows that are errors."""
    from ubc.scoring import read_results, score_archive

    source = sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))[0]
    image = nib.load(source)
    raw = np.asarray(image.dataobj, dtype=np.float32)
    root = tmp_path / "a"
    root.mkdir()
    shutil.copy(source, root / "plain_flair.nii.gz")
    mean, std = raw[raw != 0].mean(), raw[raw != 0].std()
    z = (raw - mean) / std  # z-scored with its background: (0 - mean) / std everywhere
    nib.save(nib.Nifti1Image(z.astype(np.float32), image.affine), root / "z_flair.nii.gz")
    thick = image.affine @ np.diag([1.0, 1.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(raw.astype(np.int16), thick), root / "thick_flair.nii.gz")
    noisy = raw + np.abs(np.random.default_rng(1).normal(0, 30, raw.shape))
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), image.affine),
             root / "noisy_flair.nii.gz")
    out = tmp_path / "rows.csv"
    score_archive(tiny_bundle, root, out, engine=FakeEngine())
    rows = {r.case_id: r for r in read_results(out)}
    assert rows["plain_flair"].status == "ok" and rows["z_flair"].status == "ok"
    assert f"background_shifted:{-mean / std:.6g}" in (rows["z_flair"].flags or "")
    assert rows["z_flair"].p_hgg == pytest.approx(rows["plain_flair"].p_hgg, abs=1e-4)
    assert "thick_slices:4mm" in (rows["thick_flair"].flags or "")
    assert rows["noisy_flair"].status == "error" and SKULL_FIX in (rows["noisy_flair"].error or "")
    everything = score_archive(tiny_bundle, root, tmp_path / "all.csv",
                               engine=FakeEngine(threshold=-100.0))
    implausible = [r for r in read_results(tmp_path / "all.csv") if r.status == "error"
                   and "implausible" in (r.error or "")]
    assert everything.failed == 4 and len(implausible) == 3
    assert all("implausible_lesion" in (r.flags or "") and r.p_hgg is None for r in implausible)


# --- issue 25 item 6: spacing against the training volumes, not against the model's grid
PHANTOMS = TrainedSpacing(inplane=(1.0, 1.0), thickness=(1.0, 1.0))  # ubc-synth: 1 mm
DEMO_GRID = (2.0, 2.0)  # the quick preset's grid


def _spacing_flags(spacing: tuple[float, float, float], trained: TrainedSpacing = PHANTOMS,
                   grid: tuple[float, float] = DEMO_GRID) -> tuple[str, ...]:
    return check_volume(_phantom_volume(spacing), target_spacing=grid, trained=trained).flags


def test_spacing_is_checked_against_the_training_volumes() -> None:
    assert _spacing_flags((1.0, 1.0, 1.0)) == ()  # the model's own kind of data
    assert _spacing_flags((0.5, 0.5, 1.0)) == ()  # finer: averaged down to the 2 mm grid
    assert _spacing_flags((0.9375, 0.9375, 1.2)) == ()  # within the tolerances
    assert _spacing_flags((4.0, 4.0, 1.0)) == ("inplane_spacing:4x4mm (trained 1mm)",)
    assert _spacing_flags((1.0, 3.5, 1.0)) == ("inplane_spacing:1x3.5mm (trained 1mm)",)
    assert _spacing_flags((0.9, 0.9, 5.0)) == ("thick_slices:5mm (trained 1mm)",)
    assert _spacing_flags((1.0, 1.0, 0.5)) == ("thin_slices:0.5mm (trained 1mm)",)
    clinical = TrainedSpacing(inplane=(0.45, 0.9), thickness=(4.0, 6.0))
    assert _spacing_flags((0.5, 0.5, 5.0), clinical) == ()
    assert _spacing_flags((1.0, 1.0, 1.0), clinical) == ("thin_slices:1mm (trained 4-6mm)",)
    # trained on 3 mm pixels upsampled to a 1 mm grid: sharp 1 mm pixels are new to it
    coarse = TrainedSpacing(inplane=(3.0, 3.0), thickness=(3.0, 3.0))
    assert _spacing_flags((1.0, 1.0, 3.0), coarse, (1.0, 1.0)) == (
        "inplane_spacing:1x1mm (trained 3mm)",)
    assert _spacing_flags((0.5, 0.5, 3.0), coarse, (3.0, 3.0)) == ()
    loose = Thresholds(spacing_ratio=5.0, thickness_ratio=6.0)
    assert check_volume(_phantom_volume((4.0, 4.0, 5.0)), target_spacing=DEMO_GRID,
                        trained=PHANTOMS, thresholds=loose).flags == ()


@pytest.mark.real
def test_real_volumes_are_unflagged_for_a_phantom_trained_bundle_5mm_slices_are_not(
        real_volume_paths: dict[str, Path]) -> None:
    """The issue: every real 1 mm volume was flagged ``inplane_spacing:1x1mm (trained
    2x2mm)`` by a bundle trained on 1 mm phantoms at 2 mm. A 5 mm clinical FLAIR (every
    fifth slice of the real one) stays flagged."""
    for role in ("brats_flair", "tcga_flair"):
        volume = load_volume(real_volume_paths[role])
        assert check_volume(volume, target_spacing=DEMO_GRID, trained=PHANTOMS).flags == ()
        data = np.ascontiguousarray(volume.data[:, :, ::5])
        affine = volume.affine @ np.diag([1.0, 1.0, 5.0, 1.0])
        clinical = Volume(data, (volume.spacing[0], volume.spacing[1], 5.0), affine, affine,
                          data.shape)
        assert check_volume(clinical, target_spacing=DEMO_GRID, trained=PHANTOMS).flags == (
            "thick_slices:5mm (trained 1mm)",)


def test_rows_of_held_out_phantoms_are_unflagged(phantom_archive: Path, tiny_bundle: Path,
                                                 tmp_path: Path) -> None:
    """The demo's case: a 2 mm bundle trained on 1 mm phantoms scores held-out 1 mm
    phantoms without flags, a thick-sliced copy with one; a bundle that does not record
    its training data keeps the old check against its grid."""
    from ubc.scoring import read_results, score_archive
    from ubc.synth import write_archive

    trained = write_archive(tmp_path / "train", 2, seed=9, shape=(64, 64, 24))
    bundle = record_training_data(copy_bundle(tiny_bundle, tmp_path), trained)
    root = tmp_path / "held-out"
    root.mkdir()
    source = sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))[0]
    shutil.copy(source, root / "plain_flair.nii.gz")
    image = nib.load(source)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, ::4],
                             image.affine @ np.diag([1.0, 1.0, 4.0, 1.0])),
             root / "thick_flair.nii.gz")
    score_archive(bundle, root, tmp_path / "rows.csv", engine=FakeEngine())
    rows = {r.case_id: r for r in read_results(tmp_path / "rows.csv")}
    assert rows["plain_flair"].status == "ok" and rows["plain_flair"].flags is None
    assert rows["thick_flair"].flags == "thick_slices:4mm (trained 1mm)"
    score_archive(tiny_bundle, root, tmp_path / "old.csv", engine=FakeEngine())
    old = {r.case_id: r for r in read_results(tmp_path / "old.csv")}
    assert old["plain_flair"].flags == "inplane_spacing:1x1mm (trained 2x2mm)"
