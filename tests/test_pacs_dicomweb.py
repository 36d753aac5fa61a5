"""Scoring a PACS over DICOMweb (issue 29) against a real Orthanc (tests/orthanc.py): the rows
equal those of the same studies from a folder, only the chosen series travels, SEGs go back
once, a PACS outage gives error rows naming the step and ``--retry-errors`` completes them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
pytest.importorskip("dicomweb_client")

from orthanc import (  # noqa: E402
    OrthancServer,
    PacsArchive,
    free_port,
    orthanc_fixture,
    pacs_archive_fixture,
    running_orthanc,
)
from scoring_archive import FakeEngine  # noqa: E402

from ubc.errors import UBCInputError  # noqa: E402
from ubc.net import PacsSettings, open_source  # noqa: E402
from ubc.net.dicomweb import datasets_of, uids_of  # noqa: E402
from ubc.scoring import ScoringOptions, read_results, score_archive  # noqa: E402
from ubc.scoring.result import CaseResult  # noqa: E402

__all__ = ["orthanc_fixture", "pacs_archive_fixture"]  # the fixtures, used by name

pytestmark = pytest.mark.tool


@pytest.fixture
def own_orthanc(tmp_path: Path, pacs_archive: PacsArchive) -> Iterator[OrthancServer]:
    """A server of the test's own, loaded with the module's studies (for tests that add to
    the PACS or stop it)."""
    for server in running_orthanc(tmp_path / "orthanc"):
        server.upload_folder(pacs_archive.folder)
        yield server


def _settings(tmp_path: Path, **kwargs: object) -> PacsSettings:
    return PacsSettings(**{"timeout_s": 5.0, "retries": 1, "backoff_s": 0.05,
                           "spool": tmp_path / "spool", **kwargs})  # type: ignore[arg-type]


def _rows(path: Path) -> dict[str, CaseResult]:
    return {r.case_id: r for r in read_results(path)}


def _same_scores(remote: dict[str, CaseResult], local: dict[str, CaseResult]) -> None:
    assert remote.keys() == local.keys()
    for case_id, row in remote.items():
        other = local[case_id]
        assert (row.status, row.series_uid) == (other.status, other.series_uid), case_id
        assert row.p_hgg == pytest.approx(other.p_hgg, abs=1e-6)
        assert row.lesion_volume_ml == pytest.approx(other.lesion_volume_ml, abs=1e-6)


def _score(bundle: Path, source: object, out: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    return score_archive(bundle, source, out, engine=FakeEngine(),  # type: ignore[arg-type]
                         options=ScoringOptions(**{"workers": 2, **kwargs}))  # type: ignore[arg-type]


def test_dicomweb_rows_equal_the_rows_of_the_same_studies_in_a_folder(
        pacs_archive: PacsArchive, tiny_bundle: Path, tmp_path: Path) -> None:
    local = _score(tiny_bundle, pacs_archive.folder, tmp_path / "local.csv")
    source = open_source(pacs_archive.server.dicomweb_url, _settings(tmp_path))
    try:
        summary = _score(tiny_bundle, source, tmp_path / "pacs.csv")
        again = _score(tiny_bundle, source, tmp_path / "pacs.csv")
    finally:
        source.close()
    assert summary.cases == local.cases == 3 and summary.failed == 0
    rows = _rows(tmp_path / "pacs.csv")
    _same_scores(rows, _rows(tmp_path / "local.csv"))
    assert all(r.input_digest and r.path.endswith(f"/studies/{r.study_uid}")
               for r in rows.values())
    assert (again.scored, again.skipped) == (0, 3)  # a re-run skips unchanged studies
    assert not any((tmp_path / "spool").iterdir())  # each study's spool went with its row
    text = (tmp_path / "pacs.csv").read_text()
    assert "Phantom" not in text and "^" not in text  # no patient name in a row


def test_only_the_chosen_series_is_retrieved(pacs_archive: PacsArchive,
                                             tmp_path: Path) -> None:
    import pydicom

    source = open_source(pacs_archive.server.dicomweb_url,
                         _settings(tmp_path, keep_spool=True))
    try:
        cases = source.discover(pattern=None, limit=None, series_select=None,
                                case_id="study").cases
        for case in cases:
            case.reader.load()
    finally:
        source.close()
    server = pacs_archive.server
    for case in cases:
        spooled = [p for p in (tmp_path / "spool" / case.case_id).iterdir()]
        series = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID
                  for p in spooled}
        assert series == {case.reader.columns().series_uid}
    spooled_bytes = sum(p.stat().st_size for p in (tmp_path / "spool").rglob("*.dcm"))
    whole = sum(int(server.get(f"/studies/{s}/statistics")["DiskSize"])
                for s in server.get("/studies"))
    assert spooled_bytes < 0.75 * whole  # the T1 decoys, CT and SR stayed in the PACS


def test_store_seg_once_over_the_cli_with_torch(pacs_archive: PacsArchive,
                                                own_orthanc: OrthancServer,
                                                tiny_bundle: Path, tmp_path: Path) -> None:
    from ubc.cli.infer import main

    server = own_orthanc
    common = ["--model", str(tiny_bundle), "--backend", "torch", "--device", "cpu",
              "--quiet", "--timeout", "5", "--retries", "1"]
    assert main([*common, "--input", str(pacs_archive.folder),
                 "--out", str(tmp_path / "local.csv")]) == 0
    pacs = [*common, "--input", server.dicomweb_url, "--out", str(tmp_path / "pacs.csv"),
            "--store-seg", "--spool", str(tmp_path / "spool")]
    assert main(pacs) == 0
    rows = _rows(tmp_path / "pacs.csv")
    _same_scores(rows, _rows(tmp_path / "local.csv"))
    segs = _segs(server)
    assert len(segs) == 3
    assert (tmp_path / "pacs_seg").is_dir()  # written beside --out without --dicom-seg
    for row in rows.values():
        assert row.seg_stored is not None
        uid, where = row.seg_stored.split("@", 1)
        assert where == server.dicomweb_url
        referenced = segs[uid]["ReferencedSeriesSequence"][0]["SeriesInstanceUID"]
        assert referenced == row.series_uid
    assert main(pacs) == 0  # a re-run stores nothing more
    assert len(_segs(server)) == 3


def _segs(server: OrthancServer) -> dict[str, dict]:  # type: ignore[type-arg]
    """SOPInstanceUID -> simplified tags of every SEG instance found by QIDO."""
    import urllib.request

    url = f"{server.dicomweb_url}/instances?Modality=SEG"
    with urllib.request.urlopen(url, timeout=10) as answer:
        found = json.loads(answer.read() or b"[]")
    segs = {}
    for item in found:
        uid = item["00080018"]["Value"][0]
        found_id = server.request("POST", "/tools/lookup", uid.encode(), "text/plain")[0]["ID"]
        segs[uid] = server.get(f"/instances/{found_id}/tags?simplify")
    return segs


def test_a_pacs_outage_gives_error_rows_that_retry_errors_completes(
        own_orthanc: OrthancServer, tiny_bundle: Path, tmp_path: Path) -> None:
    server = own_orthanc
    source = open_source(server.dicomweb_url, _settings(tmp_path))
    retrieve = source.pacs.retrieve

    def retrieve_then_stop(*args: object) -> list[Path]:
        files = retrieve(*args)  # type: ignore[arg-type]
        server.stop()  # the PACS goes down after the first study travelled
        return files

    source.pacs.retrieve = retrieve_then_stop  # type: ignore[method-assign, assignment]
    out = tmp_path / "pacs.csv"
    try:
        first = _score(tiny_bundle, source, out, workers=1)  # one retrieve at a time
    finally:
        source.close()
    errors = [r for r in _rows(out).values() if r.status == "error"]
    assert first.cases == 3 and len(errors) == 2
    assert all("retrieve: connection failed" in (r.error or "")
               and "after 2 tries" in (r.error or "") for r in errors)
    server.start()
    source = open_source(server.dicomweb_url, _settings(tmp_path))
    try:
        plain = _score(tiny_bundle, source, out)
        retried = _score(tiny_bundle, source, out, retry_errors=True)
    finally:
        source.close()
    assert plain.scored == 0  # without --retry-errors the error rows stay
    assert retried.scored == 2 and retried.failed == 0
    assert {r.status for r in _rows(out).values()} <= {"ok", "no_lesion"}


def test_a_dead_pacs_stops_the_run_before_any_row_naming_find(tiny_bundle: Path,
                                                               tmp_path: Path) -> None:
    source = open_source(f"http://127.0.0.1:{free_port()}/dicom-web", _settings(tmp_path))
    with pytest.raises(UBCInputError, match=r"find: connection failed .*after 2 tries"):
        _score(tiny_bundle, source, tmp_path / "pacs.csv")
    source.close()


def test_a_series_over_the_spool_cap_is_an_error_row(pacs_archive: PacsArchive,
                                                     tiny_bundle: Path,
                                                     tmp_path: Path) -> None:
    source = open_source(pacs_archive.server.dicomweb_url,
                         _settings(tmp_path, spool_max_gb=50e3 / 1e9))
    try:
        summary = _score(tiny_bundle, source, tmp_path / "pacs.csv")
    finally:
        source.close()
    rows = _rows(tmp_path / "pacs.csv").values()
    assert summary.failed == 3
    assert all("--spool-max-gb" in (r.error or "") for r in rows)


def test_a_study_that_gained_instances_is_scored_again(pacs_archive: PacsArchive,
                                                       own_orthanc: OrthancServer,
                                                       tiny_bundle: Path,
                                                       tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    out = tmp_path / "pacs.csv"
    source = open_source(own_orthanc.dicomweb_url, _settings(tmp_path))
    try:
        _score(tiny_bundle, source, out)
    finally:
        source.close()
    flair = max(pacs_archive.folder.glob("*/1_FLAIR"), key=lambda f: len(list(f.iterdir())))
    ds = pydicom.dcmread(sorted(flair.iterdir())[-1])  # of a single-frame FLAIR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "extra.dcm")
    own_orthanc.upload([tmp_path / "extra.dcm"])  # a repeat of the last slice: a new instance
    source = open_source(own_orthanc.dicomweb_url, _settings(tmp_path))
    try:
        again = _score(tiny_bundle, source, out)
    finally:
        source.close()
    assert (again.scored, again.skipped) == (1, 2)
    changed = _rows(out)[ds.StudyInstanceUID]
    assert changed.status == "error" and "same position" in (changed.error or "")


def test_qido_and_metadata_answers_that_are_not_dicom_json_are_refused() -> None:
    bad: object
    for bad in (None, {}, [1], [{"0020000D": {"vr": "UI"}}], [{"0020000D": {"Value": ["x"]}}],
                [{"0020000D": {"Value": ["1." * 40]}}]):
        with pytest.raises(ValueError):
            uids_of(bad, "0020000D")
    for bad in (None, [1], ["x"]):
        with pytest.raises(ValueError):
            datasets_of(bad)
