"""ubc.scoring.Predictor: the batching thread packs concurrent requests (asserted from its own
counters), splits large ones, honours max_wait_ms and max_queue, and every caller gets its
own answer, equal to the sequential path's (``Scorer``) on different volumes."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scoring_archive import PHANTOM_SHAPE, FakeEngine

from ubc.errors import UBCInputError
from ubc.io import load_volume
from ubc.scoring import Overloaded, Prediction, Predictor, Scorer, discover_cases
from ubc.scoring.result import COLUMNS

#: rows of ``Prediction.to_row`` that depend on how the case was fed (timing, file identity,
#: the files written)
_VARYING = {"seconds", "path", "input_bytes", "input_mtime_ns", "mask_file"}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eight different phantoms (64, 64, 24): 17 to 21 foreground slices each."""
    from ubc.synth import write_archive

    root = write_archive(tmp_path_factory.mktemp("predictor") / "a", 8, seed=21,
                         shape=PHANTOM_SHAPE)
    return [c.image for c in discover_cases(root)]


@pytest.fixture(scope="module")
def sequential(tiny_bundle: Path, volumes: list[Path],
               tmp_path_factory: pytest.TempPathFactory) -> dict[Path, tuple]:
    """What the sequential path (Scorer, one case at a time, the stand-in engine) says for
    each volume: (row, mask file)."""
    out = tmp_path_factory.mktemp("sequential")
    with Scorer(tiny_bundle, engine=FakeEngine(max_batch=64)) as scorer:
        return {path: (scorer.score(path, mask_path=out / f"{i}.nii.gz"), out / f"{i}.nii.gz")
                for i, path in enumerate(volumes)}


def _same_as_sequential(got: Prediction, expected: tuple) -> None:
    row, mask_file = expected
    want = {k: v for k, v in row.to_row().items() if k not in _VARYING}
    assert {k: v for k, v in got.to_row().items() if k not in _VARYING} == want
    assert got.status == "ok" and got.lesion_volume_ml > 0  # a real verdict, not a default
    assert np.array_equal(got.mask, np.asarray(nib.load(mask_file).dataobj))
    assert got.slices_scored == len(got.slice_indices) == len(got.slice_p_hgg)


def _in_threads(predictor: Predictor, sources: list, **kwargs) -> list[Prediction]:
    """``predict`` on every source from its own thread, all released at once."""
    barrier = threading.Barrier(len(sources))
    results: list = [None] * len(sources)

    def call(i: int) -> None:
        barrier.wait()
        try:
            results[i] = predictor.predict(sources[i], **kwargs)
        except Exception as exc:  # handed to the test's thread
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_eight_threads_are_packed_and_each_gets_its_own_answer(tiny_bundle, volumes,
                                                               sequential) -> None:
    engine = FakeEngine(max_batch=64, delay=0.002)
    with Predictor(tiny_bundle, engine=engine, max_batch=32, max_wait_ms=50) as predictor:
        results = _in_threads(predictor, volumes)
        stats = predictor.stats()
    for path, got in zip(volumes, results, strict=True):
        assert isinstance(got, Prediction), got
        _same_as_sequential(got, sequential[path])
    scored = sum(r.slices_scored for r in results)
    assert stats.requests == 8 and stats.slices == scored == engine.slices_seen
    assert stats.mean_batch > 1 and stats.batches < 8  # fewer engine calls than requests
    assert max(stats.batch_sizes) <= 32 and stats.queue_slices == 0


def test_real_engine_packed_equals_sequential(tiny_bundle, volumes, single_torch_thread) -> None:
    with Scorer(tiny_bundle, backend="torch", device="cpu") as scorer:
        expected = [scorer.score(p) for p in volumes[:4]]
    with Predictor(tiny_bundle, backend="torch", device="cpu", max_batch=16,
                   max_wait_ms=100) as predictor:
        results = _in_threads(predictor, volumes[:4], mask=False)
        assert predictor.stats().mean_batch > 1
    for row, got in zip(expected, results, strict=True):
        assert got.mask is None and got.status == row.status
        assert got.slices_used == row.slices_used and got.slices_scored == row.slices_scored
        assert got.lesion_volume_ml == pytest.approx(row.lesion_volume_ml)
        if row.p_hgg is not None:
            assert got.p_hgg == pytest.approx(row.p_hgg, abs=1e-5)


def test_a_large_request_spans_several_batches(tiny_bundle, volumes, sequential) -> None:
    with Predictor(tiny_bundle, engine=FakeEngine(max_batch=4), max_batch=4,
                   max_wait_ms=10_000) as predictor:
        start = time.perf_counter()
        got = predictor.predict(volumes[0])
        elapsed = time.perf_counter() - start
        stats = predictor.stats()
    n = got.slices_scored
    assert stats.batches == -(-n // 4) and stats.batch_sizes[4] == n // 4
    assert elapsed < 5  # full batches never wait; only the last, partial one may
    _same_as_sequential(got, sequential[volumes[0]])


def _few_slices() -> tuple[np.ndarray, np.ndarray]:
    """A (40, 40, 6) volume with 3 foreground slices, as an array + affine."""
    data = np.zeros((40, 40, 6), np.float32)
    rng = np.random.default_rng(0)
    data[8:32, 8:32, 1:4] = rng.uniform(1, 3, (24, 24, 3))
    return data, np.diag([2.0, 2.0, 3.0, 1.0])


def test_max_wait_with_a_single_caller(tiny_bundle) -> None:
    data, affine = _few_slices()
    timings = {}
    for wait_ms in (0, 300):
        with Predictor(tiny_bundle, engine=FakeEngine(), max_batch=32,
                       max_wait_ms=wait_ms) as predictor:
            start = time.perf_counter()
            got = predictor.predict(data, affine=affine)
            timings[wait_ms] = time.perf_counter() - start
            assert predictor.stats().batch_sizes == {3: 1} and got.slices_scored == 3
    assert timings[300] >= 0.3  # waited for the batch to fill ...
    assert timings[300] < 0.3 + 3.0 and timings[0] < timings[300] - 0.2  # ... and no longer


def test_overloaded_past_max_queue(tiny_bundle, volumes) -> None:
    engine = FakeEngine(max_batch=4, delay=0.05)  # 0.2 s per batch: the queue fills
    with Predictor(tiny_bundle, engine=engine, max_batch=4, max_wait_ms=0,
                   max_queue=20) as predictor:
        first = threading.Thread(target=predictor.predict, args=(volumes[0],))
        first.start()
        deadline = time.monotonic() + 10
        while predictor.stats().queue_slices == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        start = time.perf_counter()
        with pytest.raises(Overloaded, match="max_queue|retry"):
            predictor.predict(volumes[1])
        assert time.perf_counter() - start < 1.0  # refused at once, not after a wait
        first.join(timeout=30)
        assert predictor.stats().overloaded == 1
        assert predictor.predict(volumes[1]).status == "ok"  # room again


def test_bad_inputs_raise_and_the_predictor_goes_on(tiny_bundle, volumes) -> None:
    with Predictor(tiny_bundle, engine=FakeEngine()) as predictor:
        with pytest.raises(UBCInputError, match="<in memory>.*NIfTI"):
            predictor.predict(b"not a volume at all", case_id="up1")
        raw = volumes[0].read_bytes()
        with pytest.raises(UBCInputError, match="gzip"):
            predictor.predict(raw[: len(raw) // 2])
        with pytest.raises(UBCInputError, match="empty"):
            predictor.predict(np.zeros((8, 8, 4), np.int16), affine=np.eye(4))
        with pytest.raises(UBCInputError, match="4-D"):
            predictor.predict(np.ones((8, 8, 4, 2), np.int16), affine=np.eye(4))
        with pytest.raises(UBCInputError, match="not found"):
            predictor.predict(volumes[0].with_name("missing.nii.gz"))
        with pytest.raises(ValueError, match="affine"):
            predictor.predict(np.ones((8, 8, 4), np.int16))
        with pytest.raises(TypeError, match="source"):
            predictor.predict(12)  # type: ignore[arg-type]
        assert predictor.predict(volumes[0]).status == "ok"
        assert predictor.stats().requests == 1


def test_a_failed_case_raises_its_original_exception(tiny_bundle) -> None:
    """A step's failure travels with the case as the exception it was: ``predict`` raises
    that type (``Scorer`` and the batch job write its words in the row). A volume whose
    foreground is one value (a mask sent by mistake) is the input's fault, named: it was a
    bare ValueError (HTTP 500 in ubc-serve) before."""
    from ubc.errors import UBCInputError
    from ubc.io.volume import canonical_volume

    data = np.zeros((32, 32, 6), np.int16)
    data[8:24, 8:24, 1:5] = 1  # a label map, not a FLAIR
    volume = canonical_volume(data, np.eye(4), (1.0, 1.0, 1.0), None)
    with Predictor(tiny_bundle, engine=FakeEngine()) as predictor:
        with pytest.raises(UBCInputError, match="<in memory>: .*constant"):
            predictor.predict(volume)
    with Scorer(tiny_bundle, engine=FakeEngine()) as scorer:
        row = scorer.score(volume)
    assert row.status == "error" and row.error is not None
    assert row.error.startswith("<in memory>: ") and "constant" in row.error


def test_engine_failure_raises_for_its_callers_only(tiny_bundle, volumes, sequential) -> None:
    with Predictor(tiny_bundle, engine=FakeEngine(max_batch=64, fail_on=1)) as predictor:
        with pytest.raises(RuntimeError, match="simulated accelerator fault"):
            predictor.predict(volumes[0])
        _same_as_sequential(predictor.predict(volumes[0]), sequential[volumes[0]])


def test_every_source_kind_gives_the_same_prediction(tiny_bundle, volumes, sequential,
                                                     mixed_archive) -> None:
    path = volumes[2]
    image = nib.load(path)
    case_id = sequential[path][0].case_id
    with Predictor(tiny_bundle, engine=FakeEngine()) as predictor:
        got = [predictor.predict(path), predictor.predict(path.read_bytes(), case_id=case_id),
               predictor.predict(load_volume(path)),
               predictor.predict(np.asarray(image.dataobj), affine=image.affine,
                                 case_id=case_id)]
        # a file stored in another axis order: the mask comes back in that order
        root, _ = mixed_archive
        permuted = predictor.predict(root / "other" / "permuted_flair.nii.gz")
        source = predictor.predict(sorted(root.glob("*/*/*_flair.nii.gz"))[0])
    for each in got:
        _same_as_sequential(each, sequential[path])
    assert got[0].result.input_bytes == path.stat().st_size and got[1].result.input_bytes is None
    assert permuted.mask.shape == nib.load(root / "other" / "permuted_flair.nii.gz").shape
    assert np.array_equal(permuted.mask.transpose(1, 2, 0), source.mask)
    assert np.allclose(permuted.affine, nib.load(root / "other" / "permuted_flair.nii.gz").affine)


def test_predict_async_packs_concurrent_tasks(tiny_bundle, volumes, sequential) -> None:
    async def main(predictor: Predictor) -> list[Prediction]:
        return await asyncio.gather(*(predictor.predict_async(p) for p in volumes))

    with Predictor(tiny_bundle, engine=FakeEngine(max_batch=64, delay=0.002), max_batch=32,
                   max_wait_ms=50) as predictor:
        results = asyncio.run(main(predictor))
        assert predictor.stats().mean_batch > 1
    for path, got in zip(volumes, results, strict=True):
        _same_as_sequential(got, sequential[path])


def test_prediction_row_and_mask_file(tiny_bundle, volumes, tmp_path) -> None:
    with Predictor(tiny_bundle, engine=FakeEngine()) as predictor:
        got = predictor.predict(volumes[3], case_id="c3")
        predictor.warm_up()
        assert predictor.stats().requests == 1  # warm-up is not counted
    row = got.to_row()
    assert tuple(row) == COLUMNS and row["case_id"] == "c3" and row["error"] is None
    (tmp_path / "m.nii.gz").write_bytes(got.mask_nifti())
    mask = nib.load(tmp_path / "m.nii.gz")
    source = nib.load(volumes[3])
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert np.array_equal(np.asarray(mask.dataobj), got.mask)
    assert got.slice_area_mm2.sum() > 0 and set(np.unique(got.mask)) == {0, 1}


def test_closed_predictor_refuses_and_arguments_are_checked(tiny_bundle, volumes) -> None:
    predictor = Predictor(tiny_bundle, engine=FakeEngine())
    predictor.close()
    with pytest.raises(RuntimeError, match="closed"):
        predictor.predict(volumes[0])
    for bad in ({"max_batch": 0}, {"max_wait_ms": -1}, {"max_queue": 0}):
        with pytest.raises(ValueError):
            Predictor(tiny_bundle, engine=FakeEngine(), **bad)


def test_scorer_accepts_bytes_and_arrays(tiny_bundle, volumes, sequential) -> None:
    image = nib.load(volumes[1])
    with Scorer(tiny_bundle, engine=FakeEngine()) as scorer:
        from_bytes = scorer.score(volumes[1].read_bytes())
        from_array = scorer.score(np.asarray(image.dataobj), affine=image.affine)
        broken = scorer.score(b"garbage")
    expected = sequential[volumes[1]][0]
    assert from_bytes.slices_used == from_array.slices_used == expected.slices_used
    assert from_bytes.p_hgg == from_array.p_hgg == expected.p_hgg
    assert broken.status == "error" and "NIfTI" in (broken.error or "")


# An ONNX-only service must not pay for torch: device="auto" (the default) used to ask
# torch whether there is a GPU (issue 26 item 5). Run where torch is installed, so that
# importing it is possible and its absence from sys.modules means something.
_ONNX_PREDICTOR = """
import importlib.util, json, sys
import ubc
assert importlib.util.find_spec("torch") is not None, "torch must be installed here"
with ubc.Predictor(sys.argv[1], backend="onnxruntime") as predictor:
    prediction = predictor.predict(sys.argv[2])
print(json.dumps({"device": predictor.engine.device, "status": prediction.status,
                  "torch": "torch" in sys.modules}))
"""


def test_onnx_predictor_with_default_device_imports_no_torch(exported_bundle: Path,
                                                             volumes: list[Path]) -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _ONNX_PREDICTOR, str(exported_bundle),
                           str(volumes[0])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"device": "cpu", "status": report["status"], "torch": False}
    assert report["status"] in ("ok", "no_lesion")
