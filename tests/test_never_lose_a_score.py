"""Batch scoring never loses a score (issue 25): an output that fails keeps the row and
says why, every DICOM study found is a row, repeated instances are copies, rows name their
files, the disk's faults stop the run (exit 3) instead of failing every case, a killed
run's leftovers are cleaned and its Parquet fold is read once, every voxel type the loaders
accept is scored."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scoring_archive import PHANTOM_SHAPE, FakeEngine

from ubc.cli.infer import main as ubc_infer
from ubc.scoring import read_results, score_archive
from ubc.synth import phantom, phantom_affine

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")


@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom DICOM study (read-only: copy before changing)."""
    from ubc.synth import write_dicom_archive

    return write_dicom_archive(tmp_path_factory.mktemp("dicom") / "archive", 1, seed=5,
                               shape=PHANTOM_SHAPE)


def _instances(root: Path) -> list[Path]:
    from ubc.io.dicom import find_dicom_files

    return find_dicom_files(root)


def _edit(root: Path, **values: object) -> None:
    """Set (or, for None, delete) attributes in every instance under ``root``."""
    for path in _instances(root):
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


# --- 1. an output that fails keeps the score -------------------------------------------------
TYPE2 = ("StudyID", "AccessionNumber", "PatientBirthDate", "PatientSex", "PatientName",
         "PatientID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def test_seg_of_a_source_without_type2_attributes_is_written_with_them_empty(
        dicom_study: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """nii2dcm-like sources omit StudyID and more; they were an error row with the score
    dropped (AttributeError) before."""
    root = shutil.copytree(dicom_study, tmp_path / "a")
    _edit(root, **dict.fromkeys(TYPE2))
    out = tmp_path / "rows.jsonl"
    summary = score_archive(tiny_bundle, root, out, engine=FakeEngine(),
                            dicom_seg=tmp_path / "seg", masks=tmp_path / "masks")
    (row,) = read_results(out)
    assert summary.counts == {"ok": 1} and row.output_error is None, row.output_error
    seg = pydicom.dcmread(out.parent / row.seg_file)
    assert all(keyword in seg and not seg[keyword].value for keyword in TYPE2)
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(out.parent / row.seg_file)],
                                capture_output=True, text=True).stderr
        assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_a_seg_that_cannot_be_written_keeps_the_score_and_is_redone_alone(
        dicom_study: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """A failed SEG: the row keeps status, class and P(HGG), says which output failed, the
    run exits 1; --retry-errors writes just the SEG (the mask is not written again)."""
    from ubc.scoring import OutputSpec, ScoringOptions

    root = shutil.copytree(dicom_study, tmp_path / "a")
    _edit(root, FrameOfReferenceUID=None)  # Type 1: the SEG cannot be made without it
    out = tmp_path / "rows.csv"
    spec = OutputSpec.of(out, masks=tmp_path / "masks", dicom_seg=tmp_path / "seg")
    summary = score_archive(tiny_bundle, root, spec, engine=FakeEngine())
    (row,) = read_results(out)
    assert summary.failed == 1 and row.status == "ok" and row.p_hgg is not None
    assert row.predicted_class is not None
    assert row.output_error is not None and row.output_error.startswith("seg: ")
    assert "FrameOfReferenceUID" in row.output_error and row.seg_file is None
    mask = out.parent / row.mask_file
    assert mask.is_file() and not list(spec.dicom_seg.iterdir())
    assert score_archive(tiny_bundle, root, spec, engine=FakeEngine()).scored == 0
    stamp = mask.stat().st_mtime_ns
    identity = {p: p.stat().st_mtime_ns for p in _instances(root)}
    _edit(root, FrameOfReferenceUID="1.2.3.4")
    for path, ns in identity.items():  # the same study as far as resume can tell
        os.utime(path, ns=(ns, ns))
    retry = score_archive(tiny_bundle, root, spec, engine=FakeEngine(),
                          options=ScoringOptions(retry_errors=True))
    (again,) = read_results(out)
    assert retry.scored == 1 and retry.failed == 0 and again.output_error is None
    assert again.p_hgg == pytest.approx(row.p_hgg)
    assert (out.parent / again.seg_file).is_file() and again.mask_file == row.mask_file
    assert mask.stat().st_mtime_ns == stamp  # not written again
    cli = ["--model", str(tiny_bundle), "--input", str(root), "--out",
           str(tmp_path / "cli.csv"), "--dicom-seg", str(tmp_path / "seg"), "--backend",
           "torch", "--quiet"]
    _edit(root, FrameOfReferenceUID=None)
    assert ubc_infer(cli) == 1


def test_output_kept_by_a_retry_is_written_only_when_missing(tiny_bundle: Path,
                                                             tmp_path: Path) -> None:
    """An overlay that failed (its path taken by a folder) is redone by --retry-errors once
    the folder is gone; the mask written before stays untouched."""
    from ubc.scoring import OutputSpec, ScoringOptions
    from ubc.scoring.discover import safe_path
    from ubc.synth import write_archive

    archive = write_archive(tmp_path / "archive", 2, seed=5, shape=PHANTOM_SHAPE)
    out = tmp_path / "rows.jsonl"
    spec = OutputSpec.of(out, masks=tmp_path / "masks", overlays=tmp_path / "png")
    blocked = safe_path(spec.overlays, "PH005_0000", ".png")
    blocked.mkdir(parents=True)
    first = score_archive(tiny_bundle, archive, spec, engine=FakeEngine())
    rows = {r.case_id: r for r in read_results(out)}
    assert first.failed == 1 and rows["PH005_0000"].overlay_file is None
    assert "overlay: write failed (IsADirectoryError" in rows["PH005_0000"].output_error
    mask = out.parent / rows["PH005_0000"].mask_file
    stamp = mask.stat().st_mtime_ns
    blocked.rmdir()
    again = score_archive(tiny_bundle, archive, spec, engine=FakeEngine(),
                          options=ScoringOptions(retry_errors=True))
    assert again.scored == 1 and again.failed == 0
    row = {r.case_id: r for r in read_results(out)}["PH005_0000"]
    assert (out.parent / row.overlay_file).is_file() and mask.stat().st_mtime_ns == stamp


# --- 2. and 3. every study is a row; repeated instances are copies ---------------------------
def _sr(path: Path, study_uid: str, modality: str = "SR", *, sop_class: str
        = "1.2.840.10008.5.1.4.1.1.88.11") -> None:
    """A non-image object of ``study_uid`` (Basic Text SR by default)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality = modality
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_every_study_is_a_row_and_repeated_instances_are_copies(
        dicom_study: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    root = shutil.copytree(dicom_study, tmp_path / "a")
    _sr(root / "reports" / "sr1.dcm", "1.2.3.100")
    _sr(root / "reports" / "sr2.dcm", "1.2.3.100")
    _sr(root / "reports" / "plan.dcm", "1.2.3.100", "RTPLAN",
        sop_class="1.2.840.10008.5.1.4.1.1.481.5")
    _sr(root / "ct" / "no_rows.dcm", "1.2.3.200", "CT", sop_class="1.2.840.10008.5.1.4.1.1.2")
    flair = sorted(p for p in _instances(root) if "FLAIR" in str(p))
    for i, path in enumerate(flair[:3]):  # an export that holds some instances twice
        shutil.copy(path, path.with_name(f"copy{i}.dcm"))
    out = tmp_path / "rows.jsonl"
    summary = score_archive(tiny_bundle, root, out, engine=FakeEngine())
    rows = {r.study_uid: r for r in read_results(out)}
    assert summary.cases == 3 and len(rows) == 3
    assert rows["1.2.3.100"].status == "error"
    assert rows["1.2.3.100"].error == "no image series: 2 SR, 1 RTPLAN"
    assert rows["1.2.3.200"].error == "no image series: 1 CT image without Rows"
    (scored,) = [r for uid, r in rows.items() if not uid.startswith("1.2.3.")]
    assert scored.status == "ok", scored.error
    assert "duplicate_instances:3 files repeat an instance" in scored.flags


# --- 5. rows name their files ----------------------------------------------------------------
def test_rows_name_their_files_relative_to_the_results_file(tmp_path: Path,
                                                            tiny_bundle: Path) -> None:
    folder = tmp_path / "archive" / "patient 07 (Müller)"
    folder.mkdir(parents=True)
    image, _ = phantom(3, grade=1, shape=PHANTOM_SHAPE)[:2]
    nib.save(nib.Nifti1Image(image, phantom_affine(image.shape)), folder / "flair.nii.gz")
    for suffix in (".csv", ".jsonl", ".parquet"):
        out = tmp_path / "results" / f"rows{suffix}"
        score_archive(tiny_bundle, tmp_path / "archive", out, engine=FakeEngine(),
                      masks=tmp_path / f"masks{suffix}", overlays=tmp_path / f"png{suffix}")
        (row,) = read_results(out)
        assert row.mask_file == f"../masks{suffix}/patient_07_M_ller_flair-a347e3d7.nii.gz"
        assert (out.parent / row.mask_file).is_file()
        assert (out.parent / row.overlay_file).is_file() and row.seg_file is None


# --- 8. the disk's faults stop the run -------------------------------------------------------
@contextlib.contextmanager
def _tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (root only; the test skips elsewhere, saying why)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to make a full or read-only disk: "
                    f"{done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


@pytest.mark.tool
def test_out_in_a_read_only_folder_stops_before_the_model_loads(
        tmp_path: Path, tiny_bundle: Path, phantom_archive: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    with _tmpfs(tmp_path / "ro", "ro", "size=1m") as ro:
        started = time.perf_counter()
        code = ubc_infer(["--model", str(tiny_bundle), "--input", str(phantom_archive),
                          "--out", str(ro / "rows.csv"), "--backend", "torch", "--quiet"])
        took = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"--out {ro}: cannot write there (Read-only file system)" in err and ".tmp" not in err
    assert took < 2.0, f"{took:.1f}s: the check must come before the model loads"


@pytest.mark.tool
def test_a_full_disk_stops_the_run_with_exit_3_and_a_rerun_resumes(
        tmp_path: Path, tiny_bundle: Path, phantom_archive: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rows.jsonl"
    with _tmpfs(tmp_path / "small", "size=256k") as small:
        args = ["--model", str(tiny_bundle), "--input", str(phantom_archive), "--out",
                str(out), "--masks", str(small / "masks"), "--backend", "torch", "--quiet"]
        filler = _fill(small)
        assert ubc_infer(args) == 3
        err = capsys.readouterr().err
        assert "No space left on device" in err and str(small / "masks") in err
        assert [r for r in read_results(out) if r.status == "error"] == []
        assert not [p for p in (small / "masks").iterdir() if p.name.startswith(".")]
        filler.unlink()
        assert ubc_infer(args) == 0
        rows = read_results(out)
        assert len(rows) == 6 and all((out.parent / r.mask_file).is_file() for r in rows)


@pytest.mark.tool
def test_a_full_disk_while_appending_rows_exits_3_naming_out(
        tmp_path: Path, tiny_bundle: Path, phantom_archive: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # rows of ~1 kB (long paths), so that they outgrow the page the first row left room in
    archive = shutil.copytree(phantom_archive, tmp_path / ("a" * 200) / ("b" * 200))
    with _tmpfs(tmp_path / "small", "size=64k") as small:
        out = small / "rows.csv"
        args = ["--model", str(tiny_bundle), "--input", str(archive), "--out",
                str(out), "--backend", "torch", "--quiet"]
        assert ubc_infer([*args, "--limit", "1"]) == 0
        filler = _fill(small)
        assert ubc_infer(args) == 3
        err = capsys.readouterr().err
        assert f"--out {out}: cannot write the results file (No space left on device)" in err
        filler.unlink()
        assert ubc_infer(args) == 0
        assert sorted(r.case_id for r in read_results(out)) == sorted(
            f"PH005_{i:04d}" for i in range(6))


# --- 9. leftovers of a kill -------------------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_resumed_run_removes_the_temporaries_of_a_killed_one(tmp_path: Path,
                                                               tiny_bundle: Path,
                                                               phantom_archive: Path) -> None:
    from ubc.atomic import _HOST

    masks = tmp_path / "masks"
    masks.mkdir()
    dead = masks / f".PH005_0000.nii.gz.ubc-{_HOST}-{_dead_pid()}.k2j4_x9a.tmp.nii.gz"
    live = masks / f".PH005_0001.nii.gz.ubc-{_HOST}-{os.getpid()}.q8a1b2c3.tmp.nii.gz"
    other_host = masks / ".PH005_0002.nii.gz.ubc-00000000-1.z9y8x7w6.tmp.nii.gz"
    users = masks / ".notes.txt.tmp"
    for path in (dead, live, other_host, users):
        path.write_bytes(b"partial")
    score_archive(tiny_bundle, phantom_archive, tmp_path / "rows.csv", engine=FakeEngine(),
                  masks=masks, limit=1)
    assert not dead.exists()
    assert live.exists() and other_host.exists() and users.exists()


def test_the_parquet_fold_is_read_once_whatever_step_a_kill_came_between(
        tmp_path: Path, tiny_bundle: Path, phantom_archive: Path) -> None:
    """The fold's steps: journal complete -> temporary Parquet written -> renamed over the
    file -> journal removed. A kill between any two leaves one of these states on disk;
    each reads every row once, and a resumed run (and --merge) counts each case once."""
    from ubc.scoring.shards import merge_results
    from ubc.scoring.writers import ParquetResults

    def run(out: Path, limit: int) -> None:
        score_archive(tiny_bundle, phantom_archive, out, engine=FakeEngine(), limit=limit)

    base = tmp_path / "base"
    base.mkdir()
    out = base / "part.parquet"
    run(out, 2)
    journal = ParquetResults(out).journal.path
    score_archive(tiny_bundle, phantom_archive, tmp_path / "x.jsonl", engine=FakeEngine(),
                  limit=4)
    results = ParquetResults(out)  # a second run, stopped before its fold
    results.start()
    first = {r.case_id for r in read_results(out)}
    added = [r for r in read_results(tmp_path / "x.jsonl") if r.case_id not in first][:2]
    for row in added:
        results.append(row)
    expected = sorted(first | {r.case_id for r in added})
    results.journal.close()
    saved_journal, saved_table = journal.read_bytes(), out.read_bytes()
    results.close()
    folded = out.read_bytes()
    temporary = ".part.parquet.ubc-00000000-1.abcdefgh.tmp.parquet"
    states = {"journal complete": (saved_table, saved_journal, None),
              "temporary written": (saved_table, saved_journal, folded),
              "renamed, journal not removed": (folded, saved_journal, None),
              "journal removed": (folded, None, None)}
    for name, (table, journal_bytes, tmp) in states.items():
        folder = tmp_path / name.replace(" ", "_").replace(",", "")
        folder.mkdir()
        state_out = folder / "part.parquet"
        state_out.write_bytes(table)
        if journal_bytes is not None:
            (folder / journal.name).write_bytes(journal_bytes)
        if tmp is not None:
            (folder / temporary).write_bytes(tmp)
        ids = [r.case_id for r in read_results(state_out)]
        assert sorted(ids) == expected, name
        merged = merge_results(folder / "merged.csv", [state_out])
        assert merged.rows == 4, name
        run(state_out, 4)
        ids = [r.case_id for r in read_results(state_out)]
        assert sorted(ids) == expected, name
        assert not (folder / journal.name).exists(), name


# --- 10. every voxel type the loader accepts --------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "uint32", "int64", "uint64"])
def test_volumes_of_every_loaded_dtype_are_scored(dtype: str, tmp_path: Path,
                                                  tiny_bundle: Path) -> None:
    """int8 and uint32 NIfTI passed the loader and failed in preprocessing ("unsupported
    volume dtype"); NRRD carries 64-bit integers."""
    import nrrd

    image, _ = phantom(3, grade=1, shape=PHANTOM_SHAPE)[:2]
    scaled = np.clip(image / image.max() * 100, 0, 100).astype(dtype)
    folder = tmp_path / "a"
    folder.mkdir()
    if dtype in ("int8", "uint32"):
        nib.save(nib.Nifti1Image(scaled, np.eye(4), dtype=dtype), folder / "x_flair.nii.gz")
    else:
        nrrd.write(str(folder / "x_flair.nrrd"), scaled, {
            "space": "right-anterior-superior",
            "space directions": np.eye(3), "space origin": np.zeros(3)})
    out = tmp_path / "rows.jsonl"
    summary = score_archive(tiny_bundle, folder, out, engine=FakeEngine())
    (row,) = read_results(out)
    assert summary.counts == {"ok": 1}, row.error
    reference = tmp_path / "ref"
    reference.mkdir()
    nib.save(nib.Nifti1Image(scaled.astype(np.float32), np.eye(4)),
             reference / "x_flair.nii.gz")
    score_archive(tiny_bundle, reference, tmp_path / "ref.jsonl", engine=FakeEngine())
    (twin,) = read_results(tmp_path / "ref.jsonl")
    assert row.p_hgg == pytest.approx(twin.p_hgg, rel=1e-5)


def test_a_results_file_of_an_older_ubc_resumes_and_gains_the_new_columns(
        tmp_path: Path, tiny_bundle: Path, phantom_archive: Path) -> None:
    """The output columns were added at the end: a CSV written before them is read (the new
    columns empty), its cases are not scored again, and it is rewritten with today's header
    when rows are appended."""
    from ubc.scoring.result import COLUMNS

    out = tmp_path / "rows.csv"
    score_archive(tiny_bundle, phantom_archive, out, engine=FakeEngine(), limit=2)
    old = COLUMNS.index("mask_file")
    lines = [",".join(line.split(",")[:old]) for line in out.read_text().splitlines()]
    out.write_text("\n".join(lines) + "\n")  # as ubc 0.1 of 2026-12-06 wrote it
    summary = score_archive(tiny_bundle, phantom_archive, out, engine=FakeEngine())
    assert (summary.skipped, summary.scored) == (2, 4)
    assert out.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert len(read_results(out)) == 6
