"""Shared fixtures. Blocks are grouped by the part of the product they serve."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# --- tests that need an outside program (chromium, dicom3tools, mount): they skip with the
# reason on a user's machine; where UBC_REQUIRE_TOOLS=1 (.ci/run sets it) such a skip fails
REQUIRE_TOOLS_ENV = "UBC_REQUIRE_TOOLS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) \
        -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and item.get_closest_marker("tool") is not None \
            and os.environ.get(REQUIRE_TOOLS_ENV) == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_TOOLS_ENV}=1 and a test of outside tools skipped: {reason}"


# --- real MRI volumes: the folder $UBC_REAL_DATA, else ../shared/data/real beside the clone
# (present in the team's checkouts, not in a user's)
REAL_DATA_ENV = "UBC_REAL_DATA"
REAL_DATA = Path(os.environ.get(REAL_DATA_ENV)
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
BRATS_FLAIR = REAL_DATA / "BraTS-GLI-00001-000-t2f.nii.gz"
TCGA_FLAIR = REAL_DATA / "TCGA-DU-7294_fla_bet.nii.gz"
TCGA_SEG = REAL_DATA / "TCGA-DU-7294_seg_consensus.nii.gz"
REAL_DATA_SOURCE = ("the public repository BrainLesion/tutorials (Apache-2.0), folders "
                    "BraTS/data/segmentation/ and BraTS-Toolkit/data/TCGA-DU-7294/")


@pytest.fixture(scope="session")
def real_volume_paths() -> dict[str, Path]:
    """The real volumes by role; skips the test, saying how to enable it, when absent."""
    paths = {"brats_flair": BRATS_FLAIR, "tcga_flair": TCGA_FLAIR, "tcga_seg": TCGA_SEG}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        pytest.skip(f"real MRI volumes not in {REAL_DATA} ({', '.join(missing)}): set "
                    f"{REAL_DATA_ENV} to a folder holding them; they come from "
                    f"{REAL_DATA_SOURCE}")
    return paths


# --- scoring (ubc-infer, issue 5): a tiny bundle and phantom archives with bad files mixed in
@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight UBC bundle at 32 x 32 pixels of 2 mm (fast on a CPU)."""
    from scoring_archive import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny.ubc")


@pytest.fixture(scope="session")
def phantom_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six (64, 64, 24) phantoms in the BraTS layout (read-only: copy before changing)."""
    from scoring_archive import PHANTOM_SHAPE

    from ubc.synth import write_archive

    return write_archive(tmp_path_factory.mktemp("phantoms") / "archive", 6, seed=5,
                         shape=PHANTOM_SHAPE)


@pytest.fixture(scope="session")
def mixed_archive(tmp_path_factory: pytest.TempPathFactory,
                  phantom_archive: Path) -> tuple[Path, dict[str, str]]:
    """The phantoms + the first one stored in another orientation + bad files + an empty
    folder. Returns (root, {case id: words expected in its error}) (read-only)."""
    from scoring_archive import add_bad_files, add_permuted, copy_tree

    root = copy_tree(phantom_archive, tmp_path_factory.mktemp("mixed") / "archive")
    first = sorted(root.glob("*/*/*_flair.nii.gz"))[0]
    add_permuted(root, first)
    return root, add_bad_files(root, first)


# --- export and engines (issue 4): a 64 x 64 bundle, exported once, and realistic slices
ENGINE_SIZE = (64, 64)
ENGINE_SPACING = (2.0, 2.0)  # mm: a (128, 128, 48) phantom's brain fills the 64 x 64 slice


def copy_bundle(src: Path, tmp_path: Path) -> Path:
    """A private copy of a (session-scoped) bundle directory, free to corrupt or rewrite."""
    import shutil

    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """``one_torch_thread`` around one test (``pytestmark = usefixtures(...)``)."""
    with one_torch_thread():
        yield


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one intra-op thread for a while: on the shared 2-core machine, 2 OpenMP
    threads competing with other jobs ran the model 10x slower than one (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def engine_slices() -> np.ndarray:
    """64 preprocessed slices float32 [64, 1, 64, 64] of small phantoms written as NIfTI and
    read back through ubc.io + ubc.preprocess (half of them through the lesion)."""
    from ubc.bundle import Preprocessing
    from ubc.check_data import phantom_slices

    return phantom_slices(Preprocessing(size=ENGINE_SIZE, target_spacing=ENGINE_SPACING), 64,
                          seed=3, cases=4, shape=(128, 128, 48))


@pytest.fixture(scope="session")
def engine_bundle(tmp_path_factory: pytest.TempPathFactory, engine_slices: np.ndarray) -> Path:
    """A 64 x 64 ubc-resnet34 bundle (weights.pt only), random weights whose batch-norm
    statistics are re-estimated on ``engine_slices`` so that logits have a trained model's
    scale (a few units, not thousands). Read-only: copy it (shutil.copytree) to change it."""
    import torch

    from ubc.bundle import Preprocessing, create_bundle
    from ubc.model import build_model

    torch.manual_seed(0)
    model = build_model("ubc-resnet34")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad(), one_torch_thread():
        for part in np.array_split(engine_slices, 4):
            model(torch.from_numpy(part))
    path = tmp_path_factory.mktemp("engine") / "engine.ubc"
    create_bundle(path, arch="ubc-resnet34", state_dict=model.eval().state_dict(),
                  preprocessing=Preprocessing(size=ENGINE_SIZE, target_spacing=ENGINE_SPACING))
    return path


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory: pytest.TempPathFactory, engine_bundle: Path,
                    engine_slices: np.ndarray) -> Path:
    """``engine_bundle`` plus model.ts and model.onnx (read-only: copy it to change it)."""
    import shutil

    from ubc.bundle import Bundle
    from ubc.export import export

    path = tmp_path_factory.mktemp("exported") / "engine.ubc"
    shutil.copytree(engine_bundle, path)
    with one_torch_thread():
        export(Bundle(path), ("torchscript", "onnx"), example=engine_slices[:2])
    return path
