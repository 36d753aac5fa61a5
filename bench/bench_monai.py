"""The peer: the preprocessing chain a MONAI user would write for our model (LoadImage,
Orientation to RAS, Spacing to 1 mm in-plane, NormalizeIntensity over non-zero voxels,
ResizeWithPadOrCrop to 224 x 224), against ours on the same BraTS-geometry volume:

    pytest bench/bench_monai.py --benchmark-only

Two groups, MONAI first (the baseline of the ratios in the closing summary, so ours reads
"x N vs MONAI"): from the .nii.gz file to [155, 1, 224, 224], and from the loaded volume
(the compute alone). Each benchmark checks that both produce the same slices. Skipped, with
the reason, when monai is not installed (``pip install 'ubc[bench]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench.conftest import record
from ubc import io, preprocess
from ubc.benchmark.preprocessing import (
    MONAI_HINT,
    monai_chain,
    monai_slices,
    monai_transforms,
    quietly,
)
from ubc.bundle import Preprocessing

monai = pytest.importorskip("monai", reason=f"the MONAI peer needs monai ({MONAI_HINT})")

SHAPE = (240, 240, 155)
PREP = Preprocessing(size=(224, 224), target_spacing=(1.0, 1.0), norm="zscore")
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / \
    "BraTS-GLI-00001-000-t2f.nii.gz"
FILE_GROUP = "load + preprocess one volume (.nii.gz -> 155x1x224x224)"
MEMORY_GROUP = "preprocess a loaded volume (-> 155x1x224x224)"


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> Path:
    """The real BraTS FLAIR when the team's data folder is present, else a phantom file."""
    if REAL.is_file():
        return REAL
    from ubc.synth import write_archive

    root = write_archive(tmp_path_factory.mktemp("monai") / "archive", 1, shape=SHAPE)
    return sorted(root.glob("*/*/*_flair.nii.gz"))[0]


@pytest.fixture(scope="module")
def expected(path) -> np.ndarray:
    volume = io.load_volume(path)
    return preprocess.slices(volume.data, volume.spacing, size=PREP.size,
                             target_spacing=PREP.target_spacing, norm=PREP.norm)


def _check(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    # 1 mm volumes: Spacing is the identity and both crop the same centre; MONAI computes in
    # float32 where we accumulate the statistics in double.
    np.testing.assert_allclose(theirs, ours, atol=1e-3)


def test_monai_from_file(benchmark, figures, path, expected):
    chain = monai_chain(PREP)
    out = benchmark.pedantic(lambda: chain(str(path)), rounds=5, warmup_rounds=1)
    _check(expected, monai_slices(out))
    record(figures, FILE_GROUP, f"MONAI {monai.__version__} chain", benchmark)


def test_ubc_from_file(benchmark, figures, path, expected):
    def run() -> np.ndarray:
        volume = io.load_volume(path)
        return preprocess.slices(volume.data, volume.spacing, size=PREP.size,
                                 target_spacing=PREP.target_spacing, norm=PREP.norm)

    out = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    _check(expected, out)
    record(figures, FILE_GROUP, "ubc: load_volume + native slices", benchmark)


def test_monai_in_memory(benchmark, figures, path, expected):
    image = _load(path)
    chain = quietly(monai_transforms(PREP, load=False))
    out = benchmark.pedantic(chain, args=(image,), rounds=5, warmup_rounds=1)
    _check(expected, monai_slices(out))
    record(figures, MEMORY_GROUP, "MONAI transforms (image loaded)", benchmark)


def _load(path: Path):
    from monai.transforms import LoadImage

    return quietly(LoadImage(image_only=True, ensure_channel_first=True))(str(path))


def test_ubc_in_memory(benchmark, figures, path, expected):
    volume = io.load_volume(path)
    out = np.empty_like(expected)
    benchmark.pedantic(preprocess.slices, args=(volume.data, volume.spacing),
                       kwargs=dict(size=PREP.size, target_spacing=PREP.target_spacing,
                                   norm=PREP.norm, out=out), rounds=5, warmup_rounds=1)
    _check(expected, out)
    record(figures, MEMORY_GROUP, f"ubc native slices ({os.cpu_count()} cores)", benchmark)
