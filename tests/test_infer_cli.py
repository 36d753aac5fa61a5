"""ubc-infer end to end: exit codes, a run on a mixed archive, path safety, every output
format, and resume after SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest
from scoring_archive import copy_tree

import ubc
from ubc.cli.infer import main
from ubc.scoring import read_results, safe_name, score_archive
from ubc.scoring.discover import DEFAULT_PATTERN

REPO = Path(ubc.__file__).resolve().parents[1]


def _args(bundle: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(bundle), "--input", str(source), "--out", str(out),
            "--backend", "torch", "--device", "cpu", "--quiet", *extra]


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text
    for line in ("0  every case is ok", "1  some cases failed", "2  usage error"):
        assert line in text


def test_usage_errors_exit_2(tmp_path: Path, tiny_bundle: Path, phantom_archive: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tmp_path / "no.ubc", phantom_archive, tmp_path / "r.csv")) == 2
    assert "not a UBC bundle" in capsys.readouterr().err
    assert main(_args(tiny_bundle, tmp_path / "nowhere", tmp_path / "r.csv")) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(_args(tiny_bundle, phantom_archive, tmp_path / "r.xlsx")) == 2
    assert "unknown results format" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(_args(tiny_bundle, tmp_path / "empty", tmp_path / "r.csv")) == 2
    assert "no cases found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tiny_bundle)])
    assert exit_info.value.code == 2
    assert not (tmp_path / "r.csv").exists()


def test_input_by_content_and_files_not_taken(tmp_path: Path, tiny_bundle: Path,
                                              phantom_archive: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "x.dcm"
    text.write_text("this is not a dicom file\n")
    assert main(_args(tiny_bundle, text, tmp_path / "r.csv")) == 2
    assert "x.dcm: not an input: its content is not NIfTI, NRRD, DICOM or zip" in \
        capsys.readouterr().err
    root = copy_tree(phantom_archive, tmp_path / "archive")
    (root / "x.nii.gz").write_bytes(b"")
    skipped = tmp_path / "skipped.csv"
    args = [a for a in _args(tiny_bundle, root, tmp_path / "r.csv") if a != "--quiet"]
    assert main([*args, "--skipped", str(skipped)]) == 0
    out = capsys.readouterr().out
    assert "6 cases: " in out and "\n1 file not taken (name not matching --pattern): x.nii.gz " \
        "(--skipped FILE lists them all)\n" in out
    assert skipped.read_text().splitlines() == [
        "path,reason", f"{root / 'x.nii.gz'},name not matching --pattern"]
    none = tmp_path / "none"
    none.mkdir()
    (none / "t1.nii.gz").write_bytes(b"")
    assert main(_args(tiny_bundle, none, tmp_path / "r2.csv")) == 2
    assert f"{none}: no cases found: no NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) file " \
        f"whose name matches {DEFAULT_PATTERN!r} and no DICOM file (by content); 1 file not " \
        "taken (name not matching --pattern): t1.nii.gz" in capsys.readouterr().err


def test_mixed_archive_exit_1_and_rerun(tmp_path: Path, tiny_bundle: Path,
                                        mixed_archive) -> None:
    root, bad = mixed_archive
    out = tmp_path / "results.jsonl"
    args = _args(tiny_bundle, root, out, "--masks", str(tmp_path / "masks"))
    assert main(args) == 1
    rows = read_results(out)
    assert len(rows) == len({r.case_id for r in rows}) == 7 + len(bad)
    assert {r.case_id for r in rows if r.status == "error"} == set(bad)
    for row in rows:
        if row.status != "error":
            mask = nib.load(tmp_path / "masks" / f"{safe_name(row.case_id)}.nii.gz")
            source = nib.load(row.path)
            assert mask.shape == source.shape and (mask.affine == source.affine).all()
    assert main(args) == 1  # nothing left to do, but the archive still has failures
    assert read_results(out) == rows


def test_clean_archive_exit_0_and_formats_agree(tmp_path: Path, tiny_bundle: Path,
                                                phantom_archive: Path) -> None:
    tables = {}
    for suffix in (".csv", ".jsonl", ".parquet"):
        out = tmp_path / f"results{suffix}"
        assert main(_args(tiny_bundle, phantom_archive, out, "--limit", "3")) == 0
        tables[suffix] = sorted(read_results(out), key=lambda r: r.case_id)
    assert len(tables[".csv"]) == 3

    def values(rows):
        return [(r.case_id, r.status, r.slices_used, round(r.p_hgg or 0, 6),
                 round(r.lesion_volume_ml or 0, 6)) for r in rows]

    assert values(tables[".csv"]) == values(tables[".jsonl"]) == values(tables[".parquet"])


def test_case_ids_never_escape_the_masks_folder(tmp_path: Path, tiny_bundle: Path,
                                                phantom_archive: Path) -> None:
    image = sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))[0]
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    manifest = work / "manifest.csv"
    manifest.write_text(f"case_id,image\n../../etc/x,{image}\n/abs/y,{image}\n")
    masks, overlays = work / "masks", work / "overlays"
    assert main(_args(tiny_bundle, manifest, work / "r.csv", "--masks", str(masks),
                      "--overlays", str(overlays))) == 0
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    outside = [p for p in written if not str(p).startswith(("a/b/masks/", "a/b/overlays/"))]
    assert [str(p) for p in outside] == ["a/b/manifest.csv", "a/b/r.csv"]
    assert len(list(masks.iterdir())) == len(list(overlays.iterdir())) == 2
    assert (masks / f"{safe_name('../../etc/x')}.nii.gz").is_file()
    assert not (tmp_path / "etc").exists()


def _rows_written(path: Path) -> int:
    try:
        return max(path.read_bytes().count(b"\n") - 1, 0)  # minus the header
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_gives_each_case_once(tmp_path: Path, tiny_bundle: Path,
                                                  phantom_archive: Path) -> None:
    root = copy_tree(phantom_archive, tmp_path / "archive")
    reference = tmp_path / "reference.csv"
    score_archive(tiny_bundle, root, reference, backend="torch", device="cpu")
    out = tmp_path / "results.csv"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    command = [sys.executable, "-m", "ubc.cli.infer",
               *_args(tiny_bundle, root, out, "--batch-size", "1", "--workers", "1")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _rows_written(out) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    done_before = _rows_written(out)
    assert 2 <= done_before < 6, "the run must be killed mid-way for this test to mean much"
    assert main(_args(tiny_bundle, root, out)) == 0
    rows = read_results(out)
    expected = {r.case_id: r for r in read_results(reference)}
    assert sorted(r.case_id for r in rows) == sorted(expected)  # each case exactly once
    for row in rows:
        want = expected[row.case_id]
        assert (row.status, row.slices_used, row.slices_scored, row.input_bytes) == \
            (want.status, want.slices_used, want.slices_scored, want.input_bytes)
        assert row.p_hgg == pytest.approx(want.p_hgg, abs=1e-5)
        assert row.lesion_volume_ml == pytest.approx(want.lesion_volume_ml, rel=1e-6)


def test_demo_report_on_a_scored_archive(tmp_path: Path, tiny_bundle: Path,
                                         phantom_archive: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from ubc.cli.demo import report, run_infer

    assert run_infer(tiny_bundle, phantom_archive, tmp_path / "scored", "torch") == 0
    accuracy = report(phantom_archive, tmp_path / "scored")
    text = capsys.readouterr().out
    assert 0.0 <= accuracy <= 1.0 and "accuracy vs the phantoms' truth" in text
    assert "$ ubc-infer --model" in text and "PH005_0000" in text
    assert "--report" in text and (tmp_path / "scored" / "report.html").is_file()


@pytest.mark.slow
def test_demo_end_to_end_then_reuses_its_bundle(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from ubc.cli.demo import main as demo

    args = ["--workdir", str(tmp_path / "demo"), "--train-cases", "8", "--test-cases", "2",
            "--shape", "64", "64", "24", "--steps", "4"]
    assert demo(args) == 0
    first = capsys.readouterr().out
    assert "training a small UBC bundle" in first and "accuracy vs the phantoms' truth" in first
    where = dict(re.findall(r"^  (\w[\w ]*?)  +(\S+)$", first.split("where things are:")[1],
                            re.MULTILINE))
    assert set(where) == {"bundle", "training curves", "results", "report", "overlays",
                          "masks"}
    assert all(Path(path).exists() for path in where.values()), where
    assert where["training curves"].endswith(".png")
    assert demo(args) == 0
    second = capsys.readouterr().out
    assert "reusing the bundle trained by an earlier run" in second
    assert "reusing the held-out phantoms of an earlier run" in second
    assert "2 cases: " in second and "(0 scored now, 2 already in" in second
