"""Where a model's training data came from (issue 25 item 7): recorded by ubc-train, carried
by every row, said by ubc-serve, and a warning at start when the model never saw a real
scan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import copy_bundle
from scoring_archive import FakeEngine, record_training_data

from ubc.bundle import Bundle
from ubc.data import discover, training_data
from ubc.errors import BundleError
from ubc.provenance import SYNTH_MARKER, UNKNOWN, TrainingData, synthetic_warning
from ubc.scoring import read_results, score_archive

WARNING = "not on real scans"


def test_sources_are_recognised(phantom_archive: Path, tmp_path: Path) -> None:
    """ubc-synth's archives by their marker, BraTS layouts by their folders, manifests;
    counts of the cases given, spacing from their headers."""
    cases = discover(phantom_archive)
    record = training_data(phantom_archive, cases[:4])
    assert json.loads((phantom_archive / SYNTH_MARKER).read_text())["seed"] == 5
    assert record.synthetic and record.root == "archive"
    assert dict(record.cases) == {"LGG": sum(c.label == 0 for c in cases[:4]),
                                  "HGG": sum(c.label == 1 for c in cases[:4])}
    assert record.spacing is not None and record.spacing.inplane == (1.0, 1.0)
    counts = dict(record.cases)
    assert record.describe() == f"ubc-synth phantoms ({counts['HGG']} HGG, {counts['LGG']} LGG)"
    brats = shutil.copytree(phantom_archive, tmp_path / "brats")
    (brats / SYNTH_MARKER).unlink()
    assert training_data(brats, discover(brats)).source == "BraTS layout"
    manifest = tmp_path / "cases.csv"
    manifest.write_text("case_id,image,label\n" + "".join(
        f"{c.case_id},{c.image},{c.label}\n" for c in cases))
    assert training_data(manifest, discover(manifest)).source == "manifest"
    assert TrainingData.from_json(record.to_json()) == record


@pytest.mark.real
def test_a_real_brats_layout(real_volume_paths: dict[str, Path], tmp_path: Path) -> None:
    case = tmp_path / "real" / "BraTS-GLI-00001-000"
    case.mkdir(parents=True)
    (case / "BraTS-GLI-00001-000-t2f.nii.gz").symlink_to(real_volume_paths["brats_flair"])
    (tmp_path / "real" / "labels.csv").write_text("case_id,grade\nBraTS-GLI-00001-000,HGG\n")
    record = training_data(tmp_path / "real", discover(tmp_path / "real"))
    assert record.to_json() == {"source": "BraTS layout", "root": "real",
                                "cases": {"LGG": 0, "HGG": 1},
                                "spacing_mm": {"inplane": [1.0, 1.0], "thickness": [1.0, 1.0]}}
    assert synthetic_warning(record) is None


def test_every_row_says_what_the_model_was_trained_on(
        mixed_archive: tuple[Path, dict[str, str]], phantom_archive: Path, tiny_bundle: Path,
        tmp_path: Path) -> None:
    """Error rows too; a bundle without the record says ``unknown``; ``flags`` stay about
    the input."""
    root, _ = mixed_archive
    bundle = record_training_data(copy_bundle(tiny_bundle, tmp_path), phantom_archive)
    score_archive(bundle, root, tmp_path / "rows.csv", engine=FakeEngine())
    rows = read_results(tmp_path / "rows.csv")
    expected = TrainingData.of_bundle(Bundle(bundle))
    assert expected is not None and expected.synthetic
    assert {r.status for r in rows} >= {"ok", "error"}
    assert {r.trained_on for r in rows} == {expected.describe()}
    assert not any("phantom" in (r.flags or "") for r in rows)
    score_archive(tiny_bundle, root, tmp_path / "old.csv", engine=FakeEngine())
    assert {r.trained_on for r in read_results(tmp_path / "old.csv")} == {UNKNOWN}


def test_a_malformed_record_is_refused_naming_the_field(tiny_bundle: Path,
                                                       tmp_path: Path) -> None:
    bundle = Bundle(copy_bundle(tiny_bundle, tmp_path))
    bundle.update_meta(training={"training_data": {"source": "somewhere"}})
    with pytest.raises(BundleError, match="training.training_data"):
        TrainingData.of_bundle(Bundle(bundle.path))


def test_ubc_infer_warns_once_for_a_phantom_model(
        phantom_archive: Path, tiny_bundle: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from ubc.cli.infer import main

    bundle = record_training_data(copy_bundle(tiny_bundle, tmp_path), phantom_archive)
    args = ["--input", str(phantom_archive), "--backend", "torch", "--device", "cpu",
            "--limit", "1", "--quiet"]
    assert main(["--model", str(bundle), "--out", str(tmp_path / "a.csv"), *args]) == 0
    assert capsys.readouterr().err.count(WARNING) == 1
    assert main(["--model", str(tiny_bundle), "--out", str(tmp_path / "b.csv"), *args]) == 0
    assert WARNING not in capsys.readouterr().err


def test_ubc_serve_says_it(phantom_archive: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """The warning once in ubc-serve's log, the record in /v1/model and
    ``trained_on`` in each answer."""
    pytest.importorskip("uvicorn")
    from test_serve import running

    bundle = record_training_data(copy_bundle(tiny_bundle, tmp_path), phantom_archive)
    record = TrainingData.of_bundle(Bundle(bundle))
    assert record is not None
    image = next(phantom_archive.glob("*/*/*_flair.nii.gz")).read_bytes()
    with running(bundle, tmp_path) as server:
        model = httpx.get(server.url + "/v1/model").json()
        answer = httpx.post(server.url + "/v1/predict", content=image, timeout=60)
    assert model["training_data"] == record.to_json()
    assert model["trained_on"] == record.describe()
    assert answer.status_code == 200 and answer.json()["trained_on"] == record.describe()
    assert (tmp_path / "serve.log").read_text().count(WARNING) == 1


def test_a_dicom_phantom_archive_is_synthetic(tmp_path: Path) -> None:
    """ubc-synth --format dicom writes the marker too; DICOM spacing comes from the series."""
    pytest.importorskip("pydicom")
    from ubc.synth import write_dicom_archive

    root = write_dicom_archive(tmp_path / "dicom", 2, seed=3, shape=(64, 64, 24))
    record = training_data(root, discover(root))
    assert record.synthetic and dict(record.cases) == {"LGG": 1, "HGG": 1}
    assert record.spacing is not None and record.spacing.thickness == (1.0, 1.0)
