"""Preprocessing of one BraTS-geometry volume (240 x 240 x 155 int16, 1 mm) into
[155, 1, 224, 224] float32 z-scored slices, and loading it from disk; and of a clinical-like
FLAIR (512 x 512 x 30 int16 at 0.45 mm in-plane) downsampled to 1 mm with anti-aliasing.

    pytest bench/bench_preprocess.py --benchmark-only

Compared in one group: the NumPy reference (first row, the baseline of the ratios), the
native code on one thread and on all cores, the torch re-implementation a user would write,
and a plain copy of the output bytes (the floor). Each benchmark also checks its output. The
BraTS volume is benchmarked twice: C-ordered, and Fortran-ordered as nibabel gives it (one
group each; the summary also gives each time as a multiple of the copy floor).
"""

from __future__ import annotations

import dataclasses
import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bench.conftest import FLOOR, record
from ubc import io, preprocess, preprocess_reference
from ubc.benchmark.preprocessing import torch_baseline  # one copy, shared with ubc-bench
from ubc.synth import phantom, phantom_affine

SHAPE = (240, 240, 155)
SIZE = (224, 224)
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / \
    "BraTS-GLI-00001-000-t2f.nii.gz"
ORDERS = ("C order", "Fortran order")


def group(order: str) -> str:
    return f"preprocess 240x240x155 int16 ({order}) -> 155x1x224x224"


@pytest.fixture(scope="module")
def source() -> io.Volume:
    """The real BraTS FLAIR when the team's data folder is present, else a phantom."""
    if REAL.is_file():
        return io.load_volume(REAL)
    flair, _labels = phantom(0, grade=1, shape=SHAPE)[:2]
    return io.Volume(flair, (1.0, 1.0, 1.0), phantom_affine(SHAPE), phantom_affine(SHAPE), SHAPE)


@pytest.fixture(scope="module", params=ORDERS)
def order(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def volume(source, order) -> io.Volume:
    """The source's voxels C-ordered, or with x the fastest axis: the loaded file itself when it
    is so (nibabel's Fortran order, reoriented to RAS by flipping strides), else a copy."""
    data = source.data
    if order == "C order":
        data = np.ascontiguousarray(data)
    elif abs(data.strides[0]) != data.itemsize:
        data = np.asfortranarray(data)
    return dataclasses.replace(source, data=data)


@pytest.fixture(scope="module")
def expected(volume) -> np.ndarray:
    return preprocess_reference.slices(volume.data, volume.spacing, size=SIZE)


def test_numpy_reference(benchmark, figures, order, volume, expected):
    out = benchmark.pedantic(preprocess_reference.slices, args=(volume.data, volume.spacing),
                             kwargs={"size": SIZE}, rounds=2, iterations=1)
    np.testing.assert_array_equal(out, expected)
    record(figures, group(order), "numpy reference", benchmark)


@pytest.mark.parametrize("threads", [1, 0], ids=["1 thread", "all cores"])
def test_native(benchmark, figures, order, volume, expected, threads):
    out = np.empty((SHAPE[2], 1, *SIZE), np.float32)
    benchmark(preprocess.slices, volume.data, volume.spacing, size=SIZE, threads=threads, out=out)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    record(figures, group(order), f"native, {'all cores' if threads == 0 else '1 thread'}",
           benchmark)


def test_torch_baseline(benchmark, figures, order, volume, expected):
    out = benchmark(torch_baseline, volume.data, volume.spacing)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    record(figures, group(order), f"torch ({torch.get_num_threads()} threads)", benchmark)


def test_copy_floor(benchmark, figures, order, expected):
    out = np.empty_like(expected)
    benchmark(np.copyto, out, expected)
    record(figures, group(order), FLOOR, benchmark)


@pytest.fixture(scope="module")
def files(source, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("volumes")
    image = nib.Nifti1Image(np.asarray(source.data), source.affine)
    paths = {"nii.gz": folder / "v.nii.gz", "nii": folder / "v.nii"}
    for path in paths.values():
        nib.save(image, path)
    return paths


@pytest.mark.parametrize("kind", ["nii.gz", "nii"])
def test_load_volume(benchmark, figures, files, kind):
    loaded = benchmark(io.load_volume, files[kind])
    assert loaded.data.shape == SHAPE
    record(figures, "load 240x240x155 int16", f"load_volume .{kind} ({io.GZIP_BACKEND})",
           benchmark)


@pytest.mark.parametrize("module", ["gzip", "isal.igzip"])
def test_decompress(benchmark, figures, files, module):
    if module == "isal.igzip":
        isal_igzip = pytest.importorskip("isal.igzip")
        decompress = isal_igzip.decompress
    else:
        decompress = gzip.decompress
    raw = files["nii.gz"].read_bytes()
    out = benchmark(decompress, raw)
    assert len(out) > 2 * np.prod(SHAPE)
    record(figures, "gunzip 240x240x155 int16", module, benchmark)


def test_whole_preparation(benchmark, figures, files):
    """Load + preprocess, the whole of a volume's preparation before inference."""
    def prepare():
        v = io.load_volume(files["nii.gz"])
        return preprocess.slices(v.data, v.spacing, size=SIZE)
    out = benchmark(prepare)
    assert out.shape == (SHAPE[2], 1, *SIZE)
    record(figures, "load 240x240x155 int16", "load + preprocess (.nii.gz)", benchmark)


CLINICAL_SHAPE = (512, 512, 30)
CLINICAL_SPACING = (0.45, 0.45, 5.0)
CLINICAL_GROUP = "preprocess 512x512x30 int16 0.45 mm -> 30x1x224x224 1 mm (antialiased)"


@pytest.fixture(scope="module")
def clinical() -> np.ndarray:
    """A Fortran-ordered int16 head-like volume: a noisy ellipse on a zero background."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-1, 1, 512), np.linspace(-1, 1, 512), indexing="ij")
    head = ((x / 0.8) ** 2 + (y / 0.9) ** 2 < 1)[..., None]
    values = 400 + 60 * rng.standard_normal(CLINICAL_SHAPE)
    return np.asfortranarray(np.where(head, values, 0).astype(np.int16))


@pytest.fixture(scope="module")
def clinical_expected(clinical) -> np.ndarray:
    return preprocess_reference.slices(clinical, CLINICAL_SPACING, size=SIZE)


def test_clinical_numpy_reference(benchmark, figures, clinical, clinical_expected):
    out = benchmark.pedantic(preprocess_reference.slices, args=(clinical, CLINICAL_SPACING),
                             kwargs={"size": SIZE}, rounds=2, iterations=1)
    np.testing.assert_array_equal(out, clinical_expected)
    record(figures, CLINICAL_GROUP, "numpy reference", benchmark)


@pytest.mark.parametrize("threads", [1, 0], ids=["1 thread", "all cores"])
def test_clinical_native(benchmark, figures, clinical, clinical_expected, threads):
    out = np.empty((CLINICAL_SHAPE[2], 1, *SIZE), np.float32)
    benchmark(preprocess.slices, clinical, CLINICAL_SPACING, size=SIZE, threads=threads, out=out)
    np.testing.assert_allclose(out, clinical_expected, atol=1e-5)
    record(figures, CLINICAL_GROUP, f"native, {'all cores' if threads == 0 else '1 thread'}",
           benchmark)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "--benchmark-only", *sys.argv[1:]]))
