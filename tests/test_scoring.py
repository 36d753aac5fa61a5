"""ubc.scoring: discovery, path safety, aggregation, results files and resume, the pipeline's
bookkeeping and memory bound, and end to end on phantoms with bad files mixed in."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scoring_archive import PHANTOM_SHAPE, TINY_SIZE, FakeEngine, copy_tree

from ubc import preprocess
from ubc.bundle import Bundle
from ubc.errors import UBCInputError
from ubc.io import load_volume
from ubc.scoring import CaseResult, Scorer, ScoringOptions, score_archive
from ubc.scoring.aggregate import CaseAccumulator, decide, lesion_pixels, p_hgg_of
from ubc.scoring.archive import plan_resume
from ubc.scoring.discover import (
    Case,
    Skipped,
    describe_skipped,
    discover_archive,
    discover_cases,
    safe_name,
    safe_path,
)
from ubc.scoring.pipeline import PipelineOptions, max_cases_in_flight, memory_bound
from ubc.scoring.writers import open_results, read_results

# --- discovery ----------------------------------------------------------------------------


def test_discover_brats_layout_with_masks(phantom_archive: Path) -> None:
    cases = discover_cases(phantom_archive)
    assert len(cases) == 6
    assert all(c.case_id.startswith("PH005_") and "/" not in c.case_id for c in cases)
    assert all(c.mask is not None and c.mask.name.endswith("_seg.nii.gz") for c in cases)
    assert discover_cases(phantom_archive, limit=2) == cases[:2]


def test_discover_relative_ids_pattern_and_empty_folders(mixed_archive) -> None:
    root, bad = mixed_archive
    ids = {c.case_id for c in discover_cases(root)}
    assert set(bad) <= ids and "other/permuted_flair" in ids
    assert not any("seg" in i or "empty_folder" in i for i in ids)
    only_bad = discover_cases(root, pattern="bad/*")
    assert {c.case_id for c in only_bad} == set(bad)


def test_discover_default_names_of_other_editions(tmp_path: Path) -> None:
    for name in ("BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2f.nii.gz",
                 "BraTS-GLI-00001-000/BraTS-GLI-00001-000-seg.nii.gz",
                 "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1c.nii.gz",
                 "tcga/TCGA-DU-7294_fla_bet.nii.gz", "tcga/TCGA-DU-7294_seg_consensus.nii.gz",
                 "notes/flair.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    cases = {c.case_id: c for c in discover_cases(tmp_path)}
    assert sorted(cases) == ["BraTS-GLI-00001-000", "tcga/TCGA-DU-7294_fla_bet"]
    assert cases["BraTS-GLI-00001-000"].mask.name == "BraTS-GLI-00001-000-seg.nii.gz"
    assert [c.case_id for c in discover_cases(tmp_path, pattern="*t1c*|*seg_c*")] == [
        "BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1c", "tcga/TCGA-DU-7294_seg_consensus"]


def test_discover_list_and_manifest(tmp_path: Path, phantom_archive: Path) -> None:
    images = sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))
    listing = tmp_path / "cases.txt"
    listing.write_text("# scans\n" + "\n".join(os.path.relpath(p, tmp_path) for p in images)
                       + "\n\n")
    from_list = discover_cases(listing)
    assert [c.image.resolve() for c in from_list] == [p.resolve() for p in images]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case_id,image\nalpha," + str(images[0]) + "\nbeta,missing.nii.gz\n")
    cases = discover_cases(manifest)
    assert [c.case_id for c in cases] == ["alpha", "beta"]
    assert cases[1].image == tmp_path / "missing.nii.gz"  # kept: scored as an error row


def test_discover_refuses_missing_input_and_duplicate_ids(tmp_path: Path) -> None:
    with pytest.raises(UBCInputError, match="no such file"):
        discover_cases(tmp_path / "nowhere")
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,image\na,x.nii.gz\na,y.nii.gz\n")
    with pytest.raises(UBCInputError, match="duplicate case ids: a"):
        discover_cases(manifest)
    (tmp_path / "bad.csv").write_text("id,path\n")
    with pytest.raises(UBCInputError, match="case_id,image"):
        discover_cases(tmp_path / "bad.csv")


def test_a_single_file_is_taken_by_its_content(tmp_path: Path, phantom_archive: Path) -> None:
    flair = sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))[0]
    renamed = tmp_path / "scan.dcm"  # NIfTI whatever the name says
    renamed.write_bytes(flair.read_bytes())
    (case,) = discover_cases(renamed)
    assert case.case_id == "scan.dcm" and case.reader.load().data.shape == PHANTOM_SHAPE
    text = tmp_path / "x.dcm"
    text.write_text("this is not a dicom file\n")
    with pytest.raises(UBCInputError, match=r"x\.dcm: not an input: its content is not NIfTI, "
                       r"NRRD, DICOM or zip.* line 1 \('this is not a dicom file'\)"):
        discover_cases(text)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(UBCInputError, match="noise.bin: not an input.*nor text"):
        discover_cases(noise)
    listing = tmp_path / "cases.txt"  # a list stays a list, its missing files error rows
    listing.write_text(f"{flair}\n{tmp_path / 'gone_flair.nii.gz'}\n")
    assert [c.image for c in discover_cases(listing)] == [flair, tmp_path / "gone_flair.nii.gz"]


def test_volume_files_not_matching_are_listed_as_skipped(tmp_path: Path,
                                                         phantom_archive: Path) -> None:
    root = copy_tree(phantom_archive, tmp_path / "archive")
    (root / "x.nii.gz").write_bytes(b"")
    (root / "notes.txt").write_text("not a volume\n")
    found = discover_archive(root)
    assert len(found.cases) == 6  # the BraTS masks (_seg) are taken as masks, not skipped
    assert found.skipped == [Skipped(root / "x.nii.gz", "name not matching --pattern")]
    assert describe_skipped(found.skipped) == \
        "1 file not taken (name not matching --pattern): x.nii.gz"


# --- path safety --------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["../../etc/x", "/etc/passwd", "..", ".", "", "a/../../b",
                                     ".hidden", "C:\\temp\\x", "é/ü", "a" * 500])
def test_safe_path_stays_inside(tmp_path: Path, case_id: str) -> None:
    path = safe_path(tmp_path, case_id, ".nii.gz")
    assert path.parent == tmp_path.resolve()
    assert not path.name.startswith(".") and len(path.name) < 200


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=60), st.text(min_size=0, max_size=60))
def test_safe_name_is_safe_and_distinct(a: str, b: str) -> None:
    name = safe_name(a)
    assert name and "/" not in name and "\\" not in name and not name.startswith(".")
    if a != b:
        assert safe_name(a) != safe_name(b)


def test_safe_name_keeps_plain_ids() -> None:
    assert safe_name("PH005_0001") == "PH005_0001"
    assert safe_name("../../etc/x").startswith("etc_x-")


# --- aggregation --------------------------------------------------------------------------


def test_decide_top_k_mean_and_volume() -> None:
    p = np.array([0.1, 0.9, 0.8, 0.2, 0.7])
    area = np.array([0.0, 50.0, 200.0, 10.0, 100.0])
    z = np.array([3, 4, 5, 6, 7])
    v = decide(p, area, z, slice_thickness_mm=2.0, top_k=2, class_names=("LGG", "HGG"),
               hgg_index=1, min_lesion_ml=0.1)
    assert v.slices_used == (5, 7) and v.p_hgg == pytest.approx(0.75)
    assert v.predicted_class == "HGG" and v.lesion_volume_ml == pytest.approx(0.72)
    few = decide(p, area, z, slice_thickness_mm=2.0, top_k=10, class_names=("LGG", "HGG"),
                 hgg_index=1, min_lesion_ml=0.0)
    assert few.slices_used == (5, 7, 4, 6)  # never a slice without predicted lesion
    lgg = decide(1 - p, area, z, slice_thickness_mm=2.0, top_k=2, class_names=("LGG", "HGG"),
                 hgg_index=1)
    assert lgg.predicted_class == "LGG"


def test_decide_no_lesion_and_nan() -> None:
    z = np.arange(3)
    small = decide(np.full(3, 0.9), np.array([0.0, 20.0, 0.0]), z, slice_thickness_mm=1.0,
                   top_k=5, class_names=("LGG", "HGG"), hgg_index=1, min_lesion_ml=0.1)
    assert small.no_lesion and small.p_hgg is None and small.predicted_class is None
    with pytest.raises(ValueError, match="NaN"):
        decide(np.array([np.nan]), np.array([5.0]), z[:1], slice_thickness_mm=1.0, top_k=1,
               class_names=("LGG", "HGG"), hgg_index=1)


def test_background_pixels_hold_no_lesion() -> None:
    images = np.zeros((1, 4, 4), np.float32)
    images[0, 1:3, 1:3] = 0.5
    probs = np.empty((1, 4, 4), np.float16)
    pixels = lesion_pixels(np.full((1, 1, 4, 4), 5.0, np.float32), images, probs)
    assert list(pixels) == [4] and not probs[images == 0].any()
    assert (probs[images != 0] == np.float16(1 / (1 + np.exp(-5.0)))).all()


def test_an_accumulator_keeps_p_hgg_and_areas_per_slice() -> None:
    accumulator = CaseAccumulator(3, (4, 4), keep_masks=True)
    class_logits = np.array([[0.0, 0.0], [0.0, 50.0]], np.float32)
    masks = np.full((2, 1, 4, 4), -3.0, np.float32)
    masks[1, 0, :2, :] = 3.0
    accumulator.add(1, p_hgg_of(class_logits), masks, np.ones((2, 4, 4), np.float32),
                    pixel_area_mm2=4.0)
    assert accumulator.p_hgg == pytest.approx([0.0, 0.5, 1.0])
    assert list(accumulator.area_mm2) == [0.0, 0.0, 32.0] and not accumulator.complete
    assert accumulator.mask_prob is not None and (accumulator.mask_prob[2, :2] > 0.9).all()
    with pytest.raises(ValueError, match="past"):
        accumulator.add(2, p_hgg_of(class_logits), masks, np.ones((2, 4, 4), np.float32),
                        pixel_area_mm2=4.0)


# --- results files ------------------------------------------------------------------------

ROWS = [
    CaseResult("a", "/x/a.nii.gz", "ok", p_hgg=0.1 + 0.2, predicted_class="LGG",
               lesion_volume_ml=12.345678901234567, slices_total=155, slices_scored=120,
               slices_used=(70, 71, 69), model="m", bundle_sha256="ab" * 32, backend="torch",
               precision="fp32", seconds=1.5, input_bytes=123, input_mtime_ns=10**18 + 7),
    CaseResult("b/ü, \"quoted\"", "/x/b.nii.gz", "error",
               error="bad, \"gzip\"\nsecond line", input_bytes=None),
    CaseResult("c", "/x/c.nii", "no_lesion", lesion_volume_ml=0.0, slices_used=(),
               slices_total=3, slices_scored=0),
]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_results_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"results{suffix}"
    with open_results(path) as results:
        results.start()
        for row in ROWS:
            results.append(row)
    back = read_results(path)
    expected = [r if r.error is None else CaseResult(**{**r.__dict__, "error": " ".join(
        r.error.splitlines()) if suffix == ".csv" else r.error}) for r in ROWS]
    assert back == expected


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_torn_last_line_is_dropped(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"results{suffix}"
    with open_results(path) as results:
        results.start()
        results.append(ROWS[0])
    with open(path, "ab") as f:
        f.write(b'c,/x/c.nii,no_le' if suffix == ".csv" else b'{"case_id": "c", "pa')
    assert read_results(path) == [ROWS[0]]
    with open_results(path) as results:
        assert results.read() == [ROWS[0]]
        results.start()
        results.append(ROWS[2])
    assert read_results(path) == [ROWS[0], ROWS[2]]


def test_parquet_journal_survives_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    results = open_results(path)
    results.start()
    results.append(ROWS[0])
    results.journal.close()  # "killed": the journal is on disk, no Parquet file yet
    assert read_results(path) == [ROWS[0]]
    with open_results(path) as again:
        again.start()
        again.append(ROWS[2])
    assert read_results(path) == [ROWS[0], ROWS[2]]
    assert not any(p.name.endswith(".journal.jsonl") for p in tmp_path.iterdir())


def test_results_refuse_foreign_files(tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("name,score\nx,1\n")
    with pytest.raises(UBCInputError, match="not a ubc-infer results file"):
        read_results(other)
    with pytest.raises(ValueError, match="unknown results format"):
        open_results(tmp_path / "results.xlsx")


def test_plan_resume(tmp_path: Path) -> None:
    files = [tmp_path / f"{n}.nii.gz" for n in "abc"]
    for f in files:
        f.write_bytes(b"x")
    cases = [Case(f.name[0], f) for f in files]

    def row(case: Case, status: str = "ok", sha: str = "s") -> CaseResult:
        stat = case.image.stat()
        return CaseResult(case.case_id, str(case.image), status, bundle_sha256=sha,
                          input_bytes=stat.st_size, input_mtime_ns=stat.st_mtime_ns)

    existing = [row(cases[0]), row(cases[1], "error")]
    todo, done, rewrite = plan_resume(cases, existing, bundle_sha256="s")
    assert [c.case_id for c in todo] == ["c"] and rewrite is None and len(done) == 2
    todo, _, rewrite = plan_resume(cases, existing, bundle_sha256="s", retry_errors=True)
    assert [c.case_id for c in todo] == ["b", "c"] and rewrite == existing[:1]
    os.utime(files[0], ns=(1, 1))  # the file changed since it was scored
    todo, _, rewrite = plan_resume(cases, existing, bundle_sha256="s")
    assert [c.case_id for c in todo] == ["a", "c"] and rewrite == existing[1:]
    with pytest.raises(UBCInputError, match="another model"):
        plan_resume(cases, [row(cases[2], sha="other")], bundle_sha256="s")


# --- the pipeline, with a stand-in engine -------------------------------------------------


def _score_fake(bundle: Path, source: Path, out: Path, engine: FakeEngine, **kwargs):
    return score_archive(bundle, source, out, engine=engine, **kwargs)


def test_batching_across_cases_matches_one_by_one(tmp_path: Path, tiny_bundle: Path,
                                                  phantom_archive: Path) -> None:
    engine = FakeEngine(max_batch=7)
    summary = _score_fake(tiny_bundle, phantom_archive, tmp_path / "r.csv", engine,
                          options=ScoringOptions(batch_size=7, workers=3, prefetch=1))
    rows = {r.case_id: r for r in read_results(tmp_path / "r.csv")}
    assert summary.counts.get("ok", 0) + summary.counts.get("no_lesion", 0) == 6
    foreground = 0
    with Scorer(tiny_bundle, engine=FakeEngine(max_batch=64)) as scorer:
        for case in discover_cases(phantom_archive):
            alone = scorer.score(case.image)
            volume = load_volume(case.image)
            foreground += int(np.count_nonzero(preprocess.foreground_counts(volume.data)))
            got = rows[case.case_id]
            assert got.slices_used == alone.slices_used and got.status == alone.status
            assert got.p_hgg == pytest.approx(alone.p_hgg, abs=1e-12)
            assert got.lesion_volume_ml == pytest.approx(alone.lesion_volume_ml)
            assert got.slices_total == PHANTOM_SHAPE[2] > got.slices_scored
    # background-only slices never reach the engine
    assert engine.slices_seen == foreground == summary.slices_scored


def test_engine_failure_fails_only_its_cases(tmp_path: Path, tiny_bundle: Path,
                                             phantom_archive: Path) -> None:
    engine = FakeEngine(max_batch=64, fail_on=2)
    summary = _score_fake(tiny_bundle, phantom_archive, tmp_path / "r.jsonl", engine,
                          options=ScoringOptions(batch_size=64))
    rows = read_results(tmp_path / "r.jsonl")
    failed = [r for r in rows if r.status == "error"]
    assert len(rows) == 6 and 1 <= len(failed) < 6 and summary.failed == len(failed)
    assert all("simulated accelerator fault" in (r.error or "") for r in failed)


def test_no_lesion_status(tmp_path: Path, tiny_bundle: Path, phantom_archive: Path) -> None:
    engine = FakeEngine(threshold=1e9)  # predicts no lesion anywhere
    _score_fake(tiny_bundle, phantom_archive, tmp_path / "r.csv", engine)
    rows = read_results(tmp_path / "r.csv")
    assert {r.status for r in rows} == {"no_lesion"}
    assert all(r.p_hgg is None and r.slices_used == () and r.lesion_volume_ml == 0
               for r in rows)


def test_interrupted_run_keeps_its_rows_and_resumes(tmp_path: Path, tiny_bundle: Path,
                                                    phantom_archive: Path) -> None:
    seen = []

    def interrupt_after_two(result: CaseResult) -> None:
        seen.append(result.case_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    out = tmp_path / "r.csv"
    with pytest.raises(KeyboardInterrupt):
        score_archive(tiny_bundle, phantom_archive, out, engine=FakeEngine(),
                      on_result=interrupt_after_two)
    assert [r.case_id for r in read_results(out)] == seen
    again = score_archive(tiny_bundle, phantom_archive, out, engine=FakeEngine())
    assert (again.skipped, again.scored) == (2, 4)
    assert sorted(r.case_id for r in read_results(out)) == sorted(
        c.case_id for c in discover_cases(phantom_archive))


def _peak_bytes(bundle: Path, source: Path, out: Path, cases: int) -> tuple[int, int]:
    options = ScoringOptions(batch_size=8, workers=2, prefetch=2)
    gc.collect()
    tracemalloc.start()
    try:
        summary = score_archive(bundle, source, out, engine=FakeEngine(), limit=cases,
                                masks=out.parent / "masks", options=options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.scored == cases
    return peak, summary.peak_in_flight


def _peak_bytes_in_fresh_process(bundle: Path, source: Path, out: Path,
                                 cases: int) -> tuple[int, int]:
    """``_peak_bytes`` in a new interpreter. In a process that ran other tests first, the
    interpreter's interned-string table (grown by pathlib's sys.intern) can resize during
    the measurement: one multi-MB block that says nothing about the pipeline."""
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from test_scoring import _peak_bytes; "
            "print(json.dumps(_peak_bytes(*map(Path, sys.argv[2:5]), int(sys.argv[5]))))")
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(bundle),
                          str(source), str(out), str(cases)],
                         capture_output=True, text=True, check=True)
    peak, in_flight = json.loads(run.stdout.strip().splitlines()[-1])
    return int(peak), int(in_flight)


@pytest.mark.slow
def test_memory_stays_bounded_with_many_cases(tmp_path: Path, tiny_bundle: Path) -> None:
    from ubc.synth import write_archive

    source = write_archive(tmp_path / "many", 150, seed=9, shape=(40, 40, 12))
    small, in_flight_small = _peak_bytes_in_fresh_process(tiny_bundle, source,
                                                          tmp_path / "a" / "r.csv", 8)
    large, in_flight_large = _peak_bytes_in_fresh_process(tiny_bundle, source,
                                                          tmp_path / "b" / "r.csv", 150)
    options = PipelineOptions(batch_size=8, workers=2, prefetch=2)
    volume = 40 * 40 * 12 * 2 * 2  # int16 array + compressed bytes, generously
    case = 12 * 4 * TINY_SIZE[0] * TINY_SIZE[1]
    bound = memory_bound(options, volume_bytes=volume, case_bytes=case,
                         batch_bytes=8 * 4 * TINY_SIZE[0] * TINY_SIZE[1], keep_bytes=case)
    assert in_flight_small <= 8 and in_flight_large <= max_cases_in_flight(options, 8) < 150
    # Only the case list grows with the archive: 4.5 kB per case measured in a fresh
    # interpreter (Case objects, paths, resume-plan entries, result rows); holding the
    # cases' volumes or slices would add ~90 kB per case here.
    per_case = (large - small) / (150 - 8)
    assert per_case < 8192, (small, large)
    assert large < bound + 4 * 1024 * 1024, (large, bound)  # + fixed costs (nibabel, numpy)


# --- end to end with the real engine -------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_bundle: Path, mixed_archive):
    root, bad = mixed_archive
    out = tmp_path_factory.mktemp("run")
    summary = score_archive(tiny_bundle, root, out / "results.csv", masks=out / "masks",
                            overlays=out / "overlays", backend="torch", device="cpu")
    return summary, out, root, bad


def test_every_case_once_with_the_right_status(mixed_run, tiny_bundle: Path) -> None:
    summary, out, root, bad = mixed_run
    rows = read_results(out / "results.csv")
    ids = [r.case_id for r in rows]
    assert sorted(ids) == sorted(c.case_id for c in discover_cases(root))
    assert len(ids) == len(set(ids)) == 6 + 1 + len(bad)
    for row in rows:
        if row.case_id in bad:
            assert row.status == "error", row
            words = bad[row.case_id].lower().split("|")
            assert any(w in (row.error or "").lower() for w in words), row.error
        else:
            assert row.status in ("ok", "no_lesion") and row.error is None, row
            assert row.backend == "torch" and row.model == "tiny"
            assert row.bundle_sha256 == Bundle(tiny_bundle).weights_sha256
    assert summary.failed == len(bad) and summary.scored == len(rows)


def test_masks_in_the_input_grid_and_overlays(mixed_run) -> None:
    summary, out, root, bad = mixed_run
    for row in read_results(out / "results.csv"):
        mask_file = out / "masks" / f"{safe_name(row.case_id)}.nii.gz"
        if row.status == "error":
            assert not mask_file.exists()
            continue
        source, mask = nib.load(row.path), nib.load(mask_file)
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        assert (out / "overlays" / f"{safe_name(row.case_id)}.png").stat().st_size > 1000


def test_another_orientation_gives_the_same_result(mixed_run) -> None:
    summary, out, root, bad = mixed_run
    rows = {r.case_id: r for r in read_results(out / "results.csv")}
    permuted = rows["other/permuted_flair"]
    first = str(sorted(root.glob("*/*/*_flair.nii.gz"))[0])  # the one conftest permuted
    source = next(r for r in rows.values() if r.path == first)
    assert permuted.slices_used == source.slices_used
    assert permuted.p_hgg == pytest.approx(source.p_hgg, abs=1e-6)
    mask_p = nib.load(out / "masks" / f"{safe_name(permuted.case_id)}.nii.gz")
    mask_s = nib.load(out / "masks" / f"{safe_name(source.case_id)}.nii.gz")
    assert np.array_equal(np.asarray(mask_p.dataobj).transpose(1, 2, 0),
                          np.asarray(mask_s.dataobj))


def test_rerun_skips_everything(tmp_path: Path, mixed_run, tiny_bundle: Path) -> None:
    summary, out, root, bad = mixed_run
    copy = tmp_path / "results.csv"
    copy.write_bytes((out / "results.csv").read_bytes())
    engine = FakeEngine()
    again = score_archive(tiny_bundle, root, copy, engine=engine)
    assert again.scored == 0 and again.skipped == summary.cases and engine.calls == 0
    assert again.counts == summary.counts
    assert read_results(copy) == read_results(out / "results.csv")


def test_scorer_single_volume(tmp_path: Path, tiny_bundle: Path, mixed_run) -> None:
    summary, out, root, bad = mixed_run
    rows = {r.case_id: r for r in read_results(out / "results.csv")}
    image = sorted(root.glob("*/*/*_flair.nii.gz"))[0]
    with Scorer(tiny_bundle, backend="torch", device="cpu") as scorer:
        from_path = scorer.score(image, mask_path=tmp_path / "m.nii.gz")
        from_volume = scorer.score(load_volume(image))
        broken = scorer.score(root / "bad" / "truncated_flair.nii.gz")
    expected = rows[from_path.case_id]
    assert from_path.p_hgg == pytest.approx(expected.p_hgg, abs=1e-6)
    assert from_volume.slices_used == from_path.slices_used == expected.slices_used
    assert from_volume.input_bytes is None  # no file identity for an in-memory volume
    assert nib.load(tmp_path / "m.nii.gz").shape == nib.load(image).shape
    assert broken.status == "error" and "gzip" in (broken.error or "")


def test_vanished_and_unreadable_files_are_error_rows(tmp_path: Path, tiny_bundle: Path,
                                                      phantom_archive: Path) -> None:
    root = copy_tree(phantom_archive, tmp_path / "archive")
    images = sorted(root.glob("*/*/*_flair.nii.gz"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("case_id,image\n" + "".join(f"c{i},{p}\n" for i, p in enumerate(images)))
    images[0].unlink()
    images[1].chmod(0)
    try:
        score_archive(tiny_bundle, manifest, tmp_path / "r.csv", engine=FakeEngine())
    finally:
        images[1].chmod(0o644)
    rows = {r.case_id: r for r in read_results(tmp_path / "r.csv")}
    assert rows["c0"].status == "error" and "not found" in (rows["c0"].error or "")
    if os.geteuid() != 0:  # root reads anything
        assert rows["c1"].status == "error" and "permission" in (rows["c1"].error or "")
    assert all(rows[f"c{i}"].status != "error" for i in range(2, 6))


@pytest.mark.real
def test_real_volumes_score_and_masks_match_their_files(tmp_path: Path, tiny_bundle: Path,
                                                       real_volume_paths) -> None:
    with Scorer(tiny_bundle, backend="torch", device="cpu") as scorer:
        for role in ("brats_flair", "tcga_flair"):
            path = real_volume_paths[role]
            result = scorer.score(path, mask_path=tmp_path / f"{role}.nii.gz")
            assert result.status in ("ok", "no_lesion"), result.error
            assert result.slices_total == 155 > result.slices_scored > 0
            source, mask = nib.load(path), nib.load(tmp_path / f"{role}.nii.gz")
            assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)


def test_the_packer_lends_whole_batches_of_one_owner_without_copying() -> None:
    """A batch that one owner's contiguous float32 slices fill from an empty packer is a
    view of them (the engine reads them in place); partial batches and other dtypes are
    copied."""
    from ubc.scoring.packer import Packer

    packer: Packer[int] = Packer(4, (1, 2, 2))
    rows = np.arange(40, dtype=np.float32).reshape(10, 1, 2, 2)
    assert list(packer.add(0, rows[:3] + 100)) == []
    batches = [*packer.add(1, rows), packer.flush()]
    assert [b is not None and np.shares_memory(b.array, rows) for b in batches] == \
        [False, True, True, False]
    assert [[(s.owner, s.first, s.count) for s in b.segments] for b in batches if b] == \
        [[(0, 0, 3), (1, 0, 1)], [(1, 1, 4)], [(1, 5, 4)], [(1, 9, 1)]]
    wide = rows.astype(np.float64)
    assert not any(np.shares_memory(b.array, wide) for b in packer.add(2, wide))


@pytest.mark.parametrize("batch_size", [1, 3, 8, 64])
def test_the_packer_hands_every_owner_its_rows_in_order(batch_size: int) -> None:
    """Owners of 0..9 rows packed into batches: every row lands in exactly one segment, each
    owner's segments cover its rows in order, ``last`` marks its final one, and an owner
    without rows leaves no later than the batch that was filling when it came."""
    from ubc.scoring.packer import Packer

    sizes = [5, 0, 9, 1, 0, 0, 7, 2, 3, 0, 4]
    packer: Packer[int] = Packer(batch_size, (1, 2, 2))
    batches = []
    for owner, size in enumerate(sizes):
        rows = np.arange(size * 4, dtype=np.float32).reshape(size, 1, 2, 2) + 1000 * owner
        batches += list(packer.add(owner, rows))
    last = packer.flush()
    batches += [last] if last is not None else []
    assert packer.flush() is None
    seen: dict[int, list[np.ndarray]] = {owner: [] for owner in range(len(sizes))}
    order = []
    for batch in batches:
        assert len(batch.array) <= batch_size
        assert sum(s.count for s in batch.segments) == len(batch.array)
        for segment in batch.segments:
            seen[segment.owner].append(segment.rows(batch.array))
            if segment.last:
                order.append(segment.owner)
    assert order == list(range(len(sizes)))  # owners leave in the order they came
    for owner, size in enumerate(sizes):
        got = np.concatenate(seen[owner]) if seen[owner] else np.zeros((0, 1, 2, 2))
        want = np.arange(size * 4, dtype=np.float32).reshape(size, 1, 2, 2) + 1000 * owner
        np.testing.assert_array_equal(got, want)
