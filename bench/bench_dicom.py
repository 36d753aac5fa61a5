"""DICOM study -> preprocessed slices for one BraTS-geometry volume (240 x 240 x 155 int16,
1 mm), against the NIfTI path on the same voxels (issue 12; target: reading a study costs no
more than 2x the NIfTI load).

    pytest bench/bench_dicom.py --benchmark-only

Group "read 240x240x155": ``load_volume`` of the .nii.gz (the baseline), of the .nii, the
study's headers as discovery reads them, ``load_series`` of the 155 single-frame instances
and of one Enhanced MR multi-frame instance, and SimpleITK's series reader (conversion
without our checks; skipped when SimpleITK is absent). Group "study -> slices": discovery +
assembly + conformance + preprocessing against NIfTI load + conformance + preprocessing.
Group "stages (single-frame)": where a study's time goes. Every benchmark checks its output
against the NIfTI volume.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bench.conftest import record
from ubc import io, preprocess
from ubc.io.conformance import check_volume
from ubc.synth import phantom, phantom_affine

pytest.importorskip("pydicom")

from ubc.io.dicom import find_dicom_files, load_series, read_header  # noqa: E402
from ubc.io.dicom_select import scan_studies  # noqa: E402
from ubc.io.dicom_write import SeriesSpec, write_series  # noqa: E402

SHAPE = (240, 240, 155)
SIZE = (224, 224)
READ = "read 240x240x155 int16"
WHOLE = "study -> 155x1x224x224 slices"
STAGES = "stages of a single-frame study"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / \
    "BraTS-GLI-00001-000-t2f.nii.gz"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same voxels as .nii.gz, .nii, a single-frame series and a multi-frame instance."""
    if REAL.is_file():
        image = nib.load(REAL)
        data, affine = np.asarray(image.dataobj), image.affine
    else:
        data, affine = phantom(0, grade=1, shape=SHAPE)[0], phantom_affine(SHAPE)
    folder = tmp_path_factory.mktemp("dicom-bench")
    paths = {"nii.gz": folder / "v.nii.gz", "nii": folder / "v.nii",
             "single": folder / "single", "multi": folder / "multi"}
    nib.save(nib.Nifti1Image(data, affine), paths["nii.gz"])
    nib.save(nib.Nifti1Image(data, affine), paths["nii"])
    spec = SeriesSpec("1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3")
    write_series(data, affine, paths["single"], spec)
    write_series(data, affine, paths["multi"], spec, multiframe=True)
    return paths


@pytest.fixture(scope="module")
def expected(files: dict[str, Path]) -> np.ndarray:
    return np.asarray(io.load_volume(files["nii.gz"]).data)


def _study(folder: Path) -> io.Volume:
    """What ``ubc-infer`` does with a study folder before preprocessing."""
    (study,), _ = scan_studies(folder)
    assert study.chosen is not None
    return load_series(study.chosen.files)[0]


@pytest.mark.parametrize("kind", ["nii.gz", "nii"])
def test_nifti_load(benchmark, figures, files, expected, kind):
    volume = benchmark(io.load_volume, files[kind])
    assert np.array_equal(volume.data, expected)
    record(figures, READ, f"load_volume .{kind}", benchmark)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_dicom_study(benchmark, figures, files, expected, kind):
    volume = benchmark(_study, files[kind])
    assert np.array_equal(volume.data, expected)
    what = "155 single-frame instances" if kind == "single" else "1 multi-frame instance"
    record(figures, READ, f"headers + load_series, {what}", benchmark)


def test_simpleitk_series(benchmark, figures, files, expected):
    sitk = pytest.importorskip("SimpleITK")

    def read():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(files["single"])))
        return sitk.GetArrayViewFromImage(reader.Execute())

    array = benchmark(read)
    assert array.shape == expected.shape[::-1]  # (z, y, x), its own orientation
    record(figures, READ, "SimpleITK series reader (no checks)", benchmark)


def _slices(volume: io.Volume) -> np.ndarray:
    volume = check_volume(volume, target_spacing=(1.0, 1.0)).volume
    return preprocess.slices(volume.data, volume.spacing, size=SIZE, threads=1)


def test_whole_nifti(benchmark, figures, files):
    out = benchmark(lambda: _slices(io.load_volume(files["nii.gz"])))
    assert out.shape == (SHAPE[2], 1, *SIZE)
    record(figures, WHOLE, "NIfTI .nii.gz: load + checks + slices", benchmark)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_whole_dicom(benchmark, figures, files, kind):
    out = benchmark(lambda: _slices(_study(files[kind])))
    assert out.shape == (SHAPE[2], 1, *SIZE)
    record(figures, WHOLE, f"DICOM {kind}-frame: study + checks + slices", benchmark)


def test_stage_find_files(benchmark, figures, files):
    found = benchmark(find_dicom_files, files["single"])
    assert len(found) == SHAPE[2]
    record(figures, STAGES, "find files (DICM marker)", benchmark)


def test_stage_headers(benchmark, figures, files):
    paths = find_dicom_files(files["single"])
    headers = benchmark(lambda: [read_header(p) for p in paths])
    assert all(h is not None for h in headers)
    record(figures, STAGES, "read headers (discovery)", benchmark)


def test_stage_assembly(benchmark, figures, files):
    paths = find_dicom_files(files["single"])
    volume, _ = benchmark(load_series, paths)
    assert volume.data.shape == SHAPE
    record(figures, STAGES, "load_series (dcmread + pixels + checks)", benchmark)


def test_stage_dcmread(benchmark, figures, files):
    import pydicom

    paths = find_dicom_files(files["single"])
    datasets = benchmark(lambda: [pydicom.dcmread(p) for p in paths])
    assert len(datasets) == SHAPE[2]
    record(figures, STAGES, "  of which pydicom.dcmread", benchmark)


def test_stage_conformance(benchmark, figures, files):
    volume = io.load_volume(files["nii.gz"])
    benchmark(check_volume, volume)
    record(figures, STAGES, "conformance checks", benchmark)


def test_stage_preprocess(benchmark, figures, files):
    volume = io.load_volume(files["nii.gz"])
    benchmark(preprocess.slices, volume.data, volume.spacing, size=SIZE, threads=1)
    record(figures, STAGES, "preprocess (native, 1 thread)", benchmark)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "--benchmark-only", *os.sys.argv[1:]]))
