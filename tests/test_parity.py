"""Parity with eager PyTorch: the figures, the tolerances, the records in meta.json."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_bundle

from ubc.bundle import Bundle, Preprocessing
from ubc.check_data import volume_slices
from ubc.engine import load
from ubc.parity import (
    MIN_SLICES,
    TOLERANCES,
    ParityResult,
    Skipped,
    check_bundle,
    compare,
    dice,
    fatal_failures,
    format_table,
    measure,
    reference_outputs,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None



def test_measure_figures() -> None:
    rng = np.random.default_rng(0)
    cls = rng.standard_normal((8, 2)).astype(np.float32) * 3
    mask = rng.standard_normal((8, 1, 16, 16)).astype(np.float32)
    same = measure((cls, mask), (cls.copy(), mask.copy()))
    assert same == {"max_abs_class_logits": 0.0, "max_rel_class_logits": 0.0,
                    "max_abs_p_hgg": 0.0, "max_abs_mask_logits": 0.0, "mask_dice": 1.0,
                    "class_flip_share": 0.0}
    swapped = cls[:, ::-1].copy()
    swapped[0] = cls[0]  # one row unchanged, the others flip class
    figures = measure((cls, mask), (swapped, -mask))
    assert figures["class_flip_share"] == pytest.approx(7 / 8)
    assert figures["mask_dice"] == 0.0
    assert figures["max_rel_class_logits"] == pytest.approx(
        figures["max_abs_class_logits"] / np.abs(cls).max())
    with pytest.raises(ValueError, match="differ from the reference"):
        measure((cls, mask), (cls[:4], mask))


def test_dice_edge_cases() -> None:
    empty = np.zeros((2, 4), bool)
    full = np.ones((2, 4), bool)
    assert dice(empty, empty) == 1.0
    assert dice(full, empty) == 0.0
    half = full.copy()
    half[0] = False
    assert dice(full, half) == pytest.approx(2 * 4 / 12)


def test_slices_are_realistic_not_noise(engine_slices: np.ndarray) -> None:
    assert engine_slices.shape == (64, 1, 64, 64) and engine_slices.dtype == np.float32
    background = (engine_slices == 0).mean()
    assert 0.2 < background < 0.9  # brain on a zero background, as preprocess makes it
    brain = engine_slices[engine_slices != 0]
    assert abs(float(brain.mean())) < 1.0 and 0.3 < float(brain.std()) < 3.0  # z-scored


def test_bn_calibrated_bundle_has_trained_scale_logits(exported_bundle: Path,
                                                       engine_slices: np.ndarray) -> None:
    cls, _ = reference_outputs(Bundle(exported_bundle), engine_slices)
    assert np.abs(cls).max() < 50  # a random net in eval mode would give thousands


def test_compare_passes_and_is_recorded(exported_bundle: Path, tmp_path: Path,
                                        engine_slices: np.ndarray) -> None:
    path = copy_bundle(exported_bundle, tmp_path)
    result = compare(path, "onnxruntime", engine_slices, threads=1, source="phantoms",
                     record=True)
    assert isinstance(result, ParityResult) and result.passed, result.failures
    assert result.slices == 64 and result.artifact == "model.onnx"
    assert result.max_rel_class_logits <= TOLERANCES["fp32"].class_logits
    assert result.mask_dice >= 0.999 and result.class_flip_share == 0.0
    record = Bundle(path).meta["parity"]["onnxruntime:cpu:fp32:model.onnx"]
    assert record["passed"] is True and record["source"] == "phantoms"
    assert record["sha256"] == Bundle(path).meta["files"]["model.onnx"]
    with load(path, device="cpu", require_parity=True) as engine:
        assert engine.backend == "onnxruntime" and engine.selection.parity == "passed"


def test_failing_parity_is_reported_recorded_and_avoided(exported_bundle: Path,
                                                         tmp_path: Path,
                                                         engine_slices: np.ndarray) -> None:
    path = copy_bundle(exported_bundle, tmp_path)
    cls, mask = reference_outputs(Bundle(path), engine_slices)
    wrong = (cls + 0.5, -mask)  # as if the export had gone wrong
    result = compare(path, "onnxruntime", engine_slices, reference=wrong, threads=1,
                     record=True)
    assert not result.passed
    assert any("class logits off" in f for f in result.failures)
    assert any("mask Dice" in f for f in result.failures)
    assert "FAIL" in format_table([result])
    with load(path, device="cpu") as engine:
        assert engine.backend != "onnxruntime"


def test_compare_needs_enough_slices_of_the_right_size(exported_bundle: Path,
                                                       engine_slices: np.ndarray) -> None:
    with pytest.raises(ValueError, match=f"at least {MIN_SLICES} slices"):
        compare(exported_bundle, "onnxruntime", engine_slices[:10], record=False)
    with pytest.raises(ValueError, match=r"\[N, 1, 64, 64\]"):
        compare(exported_bundle, "onnxruntime", np.zeros((64, 1, 32, 32), np.float32),
                record=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        compare(exported_bundle, "onnxruntime", engine_slices, precision="fp8", record=False)


def test_check_bundle_runs_what_this_machine_can(exported_bundle: Path, tmp_path: Path,
                                                 engine_slices: np.ndarray) -> None:
    path = copy_bundle(exported_bundle, tmp_path)
    results = check_bundle(Bundle(path), engine_slices, device="cpu", record=False)
    ran = {r.backend for r in results if isinstance(r, ParityResult)}
    skipped = {r.backend: r.reason for r in results if isinstance(r, Skipped)}
    assert {"onnxruntime", "torch"} <= ran
    assert "no model.cpu-" in skipped["aoti"]
    assert not fatal_failures(results)
    assert all(r.passed for r in results if isinstance(r, ParityResult) and r.precision == "fp32")
    assert "no model.int8.onnx" in dict((r.backend, r.reason) for r in results
                                        if isinstance(r, Skipped) and r.precision == "int8"
                                        )["onnxruntime"]
    from ubc.devices import native_bf16

    ran_bf16 = [r for r in results if isinstance(r, ParityResult) and r.precision == "bf16"]
    assert len(ran_bf16) == (1 if native_bf16() and HAS_OPENVINO else 0)
    table = format_table(results)
    assert table.splitlines()[0].split()[:3] == ["backend", "device", "prec"]
    assert "FAIL" not in table  # a reduced CPU precision below its gate is not an error


@pytest.mark.real
@pytest.mark.slow
def test_case_gates_on_real_volumes(real_volume_paths: dict[str, Path],
                                    exported_bundle: Path, engine_slices: np.ndarray) -> None:
    """The case gate through the scoring path: ONNX Runtime fp32 changes no real case."""
    from ubc.engine.torch_backend import TorchEngine
    from ubc.parity import case_parity, case_verdicts, case_volumes, with_case_parity

    bundle = Bundle(exported_bundle)
    volumes = case_volumes([real_volume_paths["brats_flair"], real_volume_paths["tcga_flair"]])
    assert [case for case, _ in volumes] == ["BraTS-GLI-00001-000-t2f", "TCGA-DU-7294_fla_bet"]
    with TorchEngine(bundle, device="cpu", artifact="eager") as reference:
        expected = case_verdicts(bundle, reference, volumes)
    with load(bundle, backend="onnxruntime", threads=1) as engine:
        got = case_verdicts(bundle, engine, volumes)
    gate = case_parity(expected, got, "real")
    assert gate.passed and gate.cases == 2 and gate.max_abs_p_hgg < 1e-3, gate
    result = compare(bundle, "onnxruntime", engine_slices, threads=1)
    tcga = "TCGA-DU-7294_fla_bet"
    other = ("ok", "HGG", 0.9) if expected[tcga][0] == "no_lesion" else ("no_lesion", None, None)
    gated = with_case_parity(result, [gate, case_parity(expected, {**got, tcga: other},
                                                        "edited")])
    assert not gated.passed and gated.failures[-1].startswith("edited: 1 of 2 cases changed")
    assert gated.extra["cases"][0]["passed"] is True


@pytest.mark.real
def test_parity_on_real_volumes(real_volume_paths: dict[str, Path],
                                exported_bundle: Path, tmp_path: Path) -> None:
    """The real BraTS and TCGA FLAIR volumes through ubc.io + ubc.preprocess."""
    bundle = Bundle(copy_bundle(exported_bundle, tmp_path))
    slices = volume_slices([real_volume_paths["brats_flair"], real_volume_paths["tcga_flair"]],
                           Preprocessing(size=(64, 64), target_spacing=(4.0, 4.0)), 64)
    assert slices.shape == (64, 1, 64, 64) and np.isfinite(slices).all()
    result = compare(bundle, "onnxruntime", slices, threads=1, source="real volumes")
    assert result.passed, result.failures


@pytest.mark.slow
def test_round_trip_train_export_load_parity(tmp_path: Path, engine_slices: np.ndarray) -> None:
    """train -> export -> load each CPU backend -> parity, on a (briefly) trained bundle."""
    from ubc.export import export
    from ubc.synth import write_archive
    from ubc.training import TrainConfig, train

    archive = write_archive(tmp_path / "archive", 4, seed=11, shape=(128, 128, 48))
    config = TrainConfig.preset("quick", epochs=2, batch_size=4, threads=1)
    bundle = train(archive, tmp_path / "trained.ubc", config, progress=False).bundle
    assert bundle.preprocessing.size == (64, 64) and bundle.meta.get("training")
    export(bundle, ("torchscript", "onnx"), example=engine_slices[:2])
    results = check_bundle(bundle, engine_slices, device="cpu", source="phantoms", record=True)
    # reduced CPU precisions (OpenVINO bf16) are gated, not required: auto skips failures
    ran = [r for r in results if isinstance(r, ParityResult) and r.precision == "fp32"]
    assert {r.backend for r in ran} >= {"torch", "onnxruntime"}
    for r in ran:  # trained logits are a few units: the absolute fp32 bound applies as is
        assert r.passed and r.max_abs_class_logits <= TOLERANCES["fp32"].class_logits, r
    with load(bundle.path, device="cpu", require_parity=True, threads=1) as engine:
        assert engine.backend == "onnxruntime" and engine.selection.parity == "passed"
        class_logits, mask_logits = engine.infer(engine_slices[:5])
        assert class_logits.shape == (5, 2) and mask_logits.shape == (5, 1, 64, 64)
