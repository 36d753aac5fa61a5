"""The CPU side of scoring made faster (issue 28): the replay engine of ``ubc-bench --feed``,
and the speed-ups that must change no output (float16 mask probabilities, isal-deflated
masks, rows fsync'ed together)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scoring_archive import FakeEngine

from ubc.benchmark.feed import ReplayEngine
from ubc.io.nifti import encode_mask
from ubc.scoring.aggregate import as_float16
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


def test_float16_conversion_is_numpys_bit_for_bit() -> None:
    """Every 97th float in [0, 1] (mask probabilities), random bit patterns (NaN payloads,
    infinities, both signs), and each side of the subnormal, normal and overflow bounds."""
    probabilities = np.arange(0, 0x3F800001, 97, dtype=np.uint32)
    random = np.random.default_rng(0).integers(0, 2 ** 32, 2_000_000, dtype=np.uint64)
    bounds = np.array([0x33000000, 0x38800000, 0x477FF000, 0x47800000, 0x7F800000],
                      dtype=np.int64)
    near = (bounds[:, None] + np.arange(-2048, 2049)).ravel()
    bits = np.concatenate([probabilities, random.astype(np.uint32), near.astype(np.uint32)])
    for values in (bits.view(np.float32), (bits | np.uint32(0x80000000)).view(np.float32)):
        with np.errstate(over="ignore"):
            expected = values.astype(np.float16).view(np.uint16)
        assert np.array_equal(as_float16(values).view(np.uint16), expected)
    assert as_float16(np.ones((2, 3), np.float32)).shape == (2, 3)


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
