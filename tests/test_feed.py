"""The CPU side of scoring made faster (issue 28): the replay engine of ``ubc-bench --feed``,
and the speed-ups that must change no output (lesion pixels and probabilities, isal-deflated
masks, rows fsync'ed together)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scoring_archive import FakeEngine

from ubc.benchmark.feed import ReplayEngine
from ubc.io.nifti import encode_mask
from ubc.scoring.aggregate import lesion_pixels
from ubc.scoring.result import OK, CaseResult
from ubc.scoring.writers import open_results


def test_replay_returns_the_recorded_outputs_whatever_the_batch() -> None:
    source = FakeEngine((16, 16), max_batch=8)
    replay = ReplayEngine(source)
    slices = np.random.default_rng(0).normal(size=(10, 1, 16, 16)).astype(np.float32)
    expected = source.infer(slices)
    seen = source.slices_seen
    replay.infer(slices[:6])
    replay.infer(slices[4:])
    assert replay.misses == 10 and source.slices_seen == seen + 10
    replay.recording = False
    shuffled = slices[::-1].copy()
    logits, masks = replay.infer(shuffled)
    assert source.slices_seen == seen + 10  # answered from the record alone
    assert np.array_equal(logits, expected[0][::-1]) and np.array_equal(masks, expected[1][::-1])
    with pytest.raises(RuntimeError, match="never recorded"):
        replay.infer(shuffled + 1)


def _sweep() -> np.ndarray:
    """Mask logits: every 2**-12 over [-70, 70] (both clamps, the block skip's bound, the
    float16 steps near 0 and 1) and 2 M draws around the decision."""
    dense = np.arange(-70 * 4096, 70 * 4096, dtype=np.float32) / 4096
    drawn = np.random.default_rng(0).normal(0.0, 8.0, 2_000_000).astype(np.float32)
    return np.concatenate([dense, drawn])


def test_lesion_probabilities_are_the_correctly_rounded_sigmoid() -> None:
    """The float16 of the float32 nearest the sigmoid (float64 reference) for every logit of
    the sweep; 0 on background whatever the logit; NaN stays NaN."""
    logits = _sweep().reshape(4, -1)
    images = np.ones_like(logits)
    images[1, ::3] = 0.0  # background pixels, scattered and in whole blocks
    images[2, :5000] = -0.0
    probs = np.empty(logits.shape, np.float16)
    counts = lesion_pixels(logits, images, probs)
    head = images != 0
    assert list(counts) == list(np.count_nonzero(head & (logits > 0), axis=1))
    clamped = np.where(head, np.clip(logits, -60.0, 60.0), -60.0).astype(np.float64)
    expected = (1.0 / (1.0 + np.exp(-clamped))).astype(np.float32).astype(np.float16)
    assert np.array_equal(probs.view(np.uint16), expected.view(np.uint16))
    assert not probs[~head].any()
    special = np.array([[np.nan, np.inf, -np.inf, 1e30, -1e30, np.nan]], np.float32)
    got = np.empty(special.shape, np.float16)
    counts = lesion_pixels(special, np.array([[1, 1, 1, 1, 1, 0]], np.float32), got)
    assert np.isnan(got[0, 0]) and list(got[0, 1:]) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert list(counts) == [2]


def test_lesion_probabilities_match_the_numpy_formula_within_one_float16_step() -> None:
    """Against what scoring computed before in NumPy float32 (whose exp differs by CPU):
    never more than one float16 step apart, and such steps are rare (the masks drawn from
    them are thresholded at 0.5 after resampling)."""
    logits = _sweep().reshape(1, -1)
    probs = np.empty(logits.shape, np.float16)
    lesion_pixels(logits, np.ones_like(logits), probs)
    numpy_probs = (1.0 / (1.0 + np.exp(-np.clip(logits, -60.0, 60.0)))).astype(np.float16)
    steps = probs.view(np.uint16).astype(np.int32) - numpy_probs.view(np.uint16)
    assert np.abs(steps).max() <= 1 and np.count_nonzero(steps) < 1e-4 * steps.size


def test_the_images_float16_from_the_same_pass_are_numpys() -> None:
    """What overlays keep: NumPy's astype(float16) bit for bit, over random floats and every
    float near the binary16 boundaries (subnormal, normal, overflow), zeros, infinities and
    NaN payloads."""
    edges = [0x33000000, 0x33800000, 0x38800000, 0x3F800000, 0x477FE000, 0x47800000,
             0x7F800000, 0x7FC00000, 0x7FFFF000]
    near = np.concatenate([np.arange(e - 4096, e + 4096) for e in edges])
    drawn = np.random.default_rng(1).integers(0, 2**31, 400_000)
    magnitudes = np.concatenate([near, drawn, [0, 0x7FFFFFFF]]).astype(np.uint32)
    bits = np.concatenate([magnitudes, magnitudes | np.uint32(0x80000000)])
    images = bits.view(np.float32).reshape(2, -1)
    halves = np.empty(images.shape, np.float16)
    lesion_pixels(np.zeros_like(images), images, image_halves=halves)
    with np.errstate(over="ignore"):
        expected = images.astype(np.float16)
    assert np.array_equal(halves.view(np.uint16), expected.view(np.uint16))


def test_lesion_pixels_refuses_what_it_cannot_read() -> None:
    logits = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="shape"):
        lesion_pixels(logits, np.zeros((2, 4, 5), np.float32))
    with pytest.raises(ValueError, match="float16|uint16|dtype"):
        lesion_pixels(logits, np.ones_like(logits), np.empty((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        lesion_pixels(logits, np.ones_like(logits), np.empty((2, 16), np.float16))
    with pytest.raises(ValueError, match="shape"):
        lesion_pixels(logits, np.ones_like(logits), image_halves=np.empty((2, 16), np.float16))
    assert list(lesion_pixels(np.zeros((0, 4, 4), np.float32),
                              np.zeros((0, 4, 4), np.float32))) == []


def test_a_mask_deflated_by_isal_reads_back_its_voxels(tmp_path: Path) -> None:
    mask = np.zeros((40, 30, 20), np.uint8)
    mask[10:20, 5:25, 3:9] = 1
    affine = np.diag([0.9, 1.1, 2.0, 1.0])
    data = encode_mask(mask, affine)
    assert data == encode_mask(mask, affine)  # deterministic
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(data)
    image = nib.load(path)
    assert np.array_equal(np.asanyarray(image.dataobj), mask)
    np.testing.assert_allclose(image.affine, affine)


def test_a_row_is_on_disk_as_soon_as_it_is_appended(tmp_path: Path) -> None:
    """Rows are fsync'ed together, but each is flushed at once: a process killed after
    ``append`` keeps it (the file read by another reader holds it before ``close``)."""
    path = tmp_path / "scores.csv"
    results = open_results(path)
    results.start()
    rows = [CaseResult(case_id=f"c{i}", path=f"c{i}.nii.gz", status=OK) for i in range(3)]
    for i, row in enumerate(rows):
        results.append(row)
        assert [r.case_id for r in open_results(path).read()] == [r.case_id
                                                                  for r in rows[:i + 1]]
    results.close()
    assert len(open_results(path).read()) == 3


def test_ray_stages_measure_each_task_on_the_cases_it_scores(tiny_bundle: Path,
                                                              phantom_archive: Path,
                                                              tmp_path: Path) -> None:
    """``--feed``'s figures of ``ubc-infer --ray``'s three tasks: the CPU milliseconds of
    the load task, the engine actor's own work (its ``actor_s``) and the finish task, over
    cases that really go through them (every case gets its mask)."""
    from ubc.benchmark.feed import ray_stages
    from ubc.bundle import Bundle
    from ubc.scoring import discover_cases

    bundle = Bundle(tiny_bundle)
    replay = ReplayEngine(FakeEngine(bundle.preprocessing.size))
    stages = ray_stages(replay, bundle, phantom_archive, tmp_path / "out")
    assert set(stages) == {"load_task", "actor", "finish_task"}
    assert all(ms > 0 for ms in stages.values())
    masks = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    assert len(masks) == len(discover_cases(phantom_archive)) and replay.misses > 0
