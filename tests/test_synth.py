"""Synthetic phantoms: geometry, labels, determinism, the archive layout, the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from ubc.io import load_volume
from ubc.synth import SynthConfig, _smooth_field, looks_hgg, phantom, write_archive

SMALL = (64, 64, 24)


@pytest.mark.parametrize("grade", [0, 1])
def test_phantom_is_a_skull_stripped_head_with_one_lesion(grade: int) -> None:
    shape = (96, 96, 40)
    flair, seg, label = phantom(5, grade=grade, shape=shape, config=SynthConfig(overlap=0))
    assert label == grade
    assert flair.dtype == np.int16 and seg.dtype == np.uint8
    assert flair.shape == seg.shape == shape
    brain = flair > 0
    assert 0.1 < brain.mean() < 0.6  # a head inside a black background
    assert not (seg[~brain] > 0).any()  # the lesion lies inside the brain
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    lesion = seg > 0
    assert lesion.sum() > 50
    oedema = seg == 2
    # FLAIR-bright (an LGG border fades into the tissue, so its mean is only ~1.15-1.4x)
    assert flair[oedema].mean() > 1.1 * flair[brain & ~lesion].mean()


def test_grades_differ_in_structure_not_in_size() -> None:
    """HGG-like lesions carry a necrotic core and an enhancing rim, LGG-like ones do not;
    mean lesion areas of the two grades are within 35 % of each other (no size shortcut)."""
    config = SynthConfig(overlap=0)
    areas: dict[int, list[float]] = {0: [], 1: []}
    cores = 0
    lgg_codes = np.zeros(5, np.int64)
    for seed in range(24):
        grade = seed % 2
        _flair, seg, _ = phantom(seed, grade=grade, shape=(96, 96, 48), config=config)
        areas[grade].append(np.sort((seg > 0).sum(axis=(0, 1)))[-5:].mean())
        if grade:
            assert (seg == 4).any()
            cores += bool((seg == 1).any())  # a core of 1-2 voxels can vanish in a small head
        else:
            assert not (seg == 4).any()
            lgg_codes += np.bincount(seg.ravel(), minlength=5)
    assert cores >= 10
    assert lgg_codes[2] > 2 * lgg_codes[1]  # LGG: mostly oedema-like
    ratio = np.mean(areas[1]) / np.mean(areas[0])
    assert 0.65 < ratio < 1.35


def test_smooth_fields_have_zero_mean() -> None:
    """A field's mean is not a random gain: exp(bias * field) must not rescale a whole case."""
    means = [float(_smooth_field(np.random.default_rng(i), (64, 64, 40), (3, 3, 3)).mean())
             for i in range(50)]
    assert max(abs(m) for m in means) < 0.1


def test_nuisance_does_not_depend_on_the_grade() -> None:
    """Unlabelled bright spots appear in both grades and the noise level varies per case."""
    def spots_and_noise(grade: int, seed: int) -> tuple[int, float]:
        config = SynthConfig(overlap=0, spots=3)
        flair, seg, _ = phantom(seed, grade=grade, shape=(96, 96, 40), config=config)
        bare, _, _ = phantom(seed, grade=grade, shape=(96, 96, 40),
                             config=SynthConfig(overlap=0, spots=0))
        changed = (flair != bare) & (seg == 0)
        background = flair[(flair > 0) & (seg == 0)]
        return int(changed.sum()), float(np.percentile(background, 75) - np.median(background))

    for grade in (0, 1):
        found = [spots_and_noise(grade, seed) for seed in range(8)]
        assert sum(n > 0 for n, _ in found) >= 3  # spots in several cases of each grade
    # the spots draw comes after the grade's lesion: with 0 spots the rest is identical
    assert phantom(2, grade=1, shape=SMALL)[1].tolist() == \
        phantom(2, grade=1, shape=SMALL, config=SynthConfig(spots=0))[1].tolist()


def test_hgg_core_keeps_a_minimum_radius() -> None:
    """The necrotic core (label 1) keeps a radius of about 2 pixels of 3 mm on its widest
    slice in a BraTS-size head (min_core_mm = 6; the lobulated border costs up to ~10 %)."""
    for seed in range(4):
        _f, seg, _ = phantom(seed, grade=1, shape=(240, 240, 64), config=SynthConfig(overlap=0))
        widest = max((seg[:, :, z] == 1).sum() for z in range(seg.shape[2]))
        assert np.sqrt(widest / np.pi) >= 5.4, seed


def test_appearance_is_known_and_overlaps_at_the_configured_rate() -> None:
    config = SynthConfig(overlap=0.1)
    flips = [looks_hgg(np.random.SeedSequence([0, i]), i % 2, config) != bool(i % 2)
             for i in range(400)]
    assert 0.06 < np.mean(flips) < 0.14
    _f, seg, _ = phantom(3, grade=0, shape=SMALL, config=SynthConfig(overlap=1.0))
    assert looks_hgg(3, 0, SynthConfig(overlap=1.0)) and (seg == 4).any()


def test_every_phantom_has_a_lesion() -> None:
    for seed in range(40):  # an empty lesion once stopped the sweep: it must not happen
        _f, seg, _ = phantom(seed, grade=seed % 2, shape=(64, 64, 40))
        assert (seg > 0).sum() > 20, seed


def test_overlap_gives_the_other_grades_appearance() -> None:
    _f, seg, label = phantom(3, grade=0, shape=SMALL, config=SynthConfig(overlap=1.0))
    assert label == 0 and (seg == 4).any()


def test_same_seed_same_bytes_and_prefix_property(tmp_path: Path) -> None:
    a = write_archive(tmp_path / "a", 4, seed=9, shape=SMALL)
    b = write_archive(tmp_path / "b", 4, seed=9, shape=SMALL)
    c = write_archive(tmp_path / "c", 6, seed=9, shape=SMALL)
    files = sorted(p.relative_to(a) for p in a.rglob("*.nii.gz"))
    assert len(files) == 8
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes() == (c / rel).read_bytes()
    d = write_archive(tmp_path / "d", 4, seed=10, shape=SMALL)
    first = sorted(d.rglob("*_flair.nii.gz"))[0]
    assert first.read_bytes() not in {(a / r).read_bytes() for r in files}


def test_archive_layout_labels_and_geometry(tmp_path: Path) -> None:
    root = write_archive(tmp_path / "arch", 4, seed=2, shape=SMALL)
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["grade"] for r in rows) == ["HGG", "HGG", "LGG", "LGG"]
    for row in rows:
        folder = root / row["grade"] / row["case_id"]
        volume = load_volume(folder / f"{row['case_id']}_flair.nii.gz")
        seg = load_volume(folder / f"{row['case_id']}_seg.nii.gz")
        assert volume.spacing == (1.0, 1.0, 1.0)
        assert volume.data.shape == seg.data.shape == SMALL
        assert np.allclose(np.diag(volume.original_affine)[:3], [-1, -1, 1])  # LPS on disk
        flair, labels, _ = phantom(np.random.SeedSequence([2, int(row["case_id"][-4:])]),
                                   grade=["LGG", "HGG"].index(row["grade"]), shape=SMALL)
        assert np.array_equal(volume.data, flair[::-1, ::-1, :])  # LPS -> RAS flips x, y
        assert np.array_equal(seg.data, labels[::-1, ::-1, :])


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grade"):
        phantom(0, grade=2, shape=SMALL)
    with pytest.raises(ValueError, match="shape"):
        phantom(0, grade=0, shape=(4, 64, 64))
    with pytest.raises(ValueError, match="cases"):
        write_archive(tmp_path, 0)


def test_cli_writes_an_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ubc.cli.synth import main

    assert main([str(tmp_path / "cli"), "--cases", "2", "--seed", "1", "--shape", "64", "64",
                 "24", "--core-contrast", "0.3"]) == 0
    assert len(list((tmp_path / "cli").rglob("*_seg.nii.gz"))) == 2
    assert "wrote 2 phantoms" in capsys.readouterr().out


@pytest.mark.slow
def test_full_size_phantom_is_fast() -> None:
    import time

    start = time.perf_counter()
    flair, _seg, _ = phantom(0, grade=1)
    assert flair.shape == (240, 240, 155)
    assert time.perf_counter() - start < 3.0
