"""Scoring a PACS over DIMSE (issue 29): a real Orthanc (tests/orthanc.py) holding synth
studies plus decoys, reached by C-FIND, C-GET or C-MOVE, C-STORE of the SEGs back."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from orthanc import (  # noqa: F401  (the fixtures orthanc and pacs_archive)
    OUR_AET,
    OrthancServer,
    PacsArchive,
    orthanc_fixture,
    pacs_archive_fixture,
    running_orthanc,
)

from ubc.cli.infer import main as ubc_infer
from ubc.errors import UBCInputError
from ubc.scoring import read_results
from ubc.scoring.result import CaseResult

#: what a PACS row and a folder row of the same study must share (P(HGG) within 1e-6)
SAME = ("status", "error", "predicted_class", "study_uid", "series_uid", "series_description",
        "flags", "slices_total", "slices_scored", "slices_used")
PATIENT_ATTRIBUTES = ("Phantom^Synthetic", "Decoy^Patient", "PatientName", "BirthDate")
QUICK = ("--timeout", "5", "--retries", "1")


def _rows(path: Path) -> dict[str, CaseResult]:
    return {r.case_id: r for r in read_results(path)}


def _infer(bundle: Path, source: str | Path, out: Path, *extra: str) -> int:
    return ubc_infer(["--model", str(bundle), "--input", str(source), "--out", str(out),
                      "--quiet", *extra])


def assert_same_rows(pacs: dict[str, CaseResult], folder: dict[str, CaseResult]) -> None:
    assert pacs.keys() == folder.keys()
    for case_id, row in pacs.items():
        local = folder[case_id]
        assert {k: getattr(row, k) for k in SAME} == {k: getattr(local, k) for k in SAME}
        if local.p_hgg is not None:
            assert row.p_hgg == pytest.approx(local.p_hgg, abs=1e-6)
            assert row.lesion_volume_ml == pytest.approx(local.lesion_volume_ml, abs=1e-6)


@pytest.fixture(scope="module")
def folder_rows(pacs_archive: PacsArchive, tiny_bundle: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, CaseResult]:
    """ubc-infer's rows of the PACS's studies exported to a folder."""
    out = tmp_path_factory.mktemp("folder") / "rows.jsonl"
    assert _infer(tiny_bundle, pacs_archive.folder, out) == 0
    return _rows(out)


@pytest.fixture
def own_orthanc(tmp_path: Path, pacs_archive: PacsArchive) -> Iterator[OrthancServer]:
    """A server of the test's own (it is written to or stopped), holding the studies."""
    for server in running_orthanc(tmp_path / "orthanc"):
        server.upload_folder(pacs_archive.folder)
        yield server


# --- C-FIND + C-GET or C-MOVE: the rows of the folder ------------------------------------
@pytest.mark.tool
@pytest.mark.parametrize("retrieval", ["C-GET", "C-MOVE"])
def test_dimse_rows_equal_the_folder_rows(
        retrieval: str, pacs_archive: PacsArchive, folder_rows: dict[str, CaseResult],
        tiny_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = pacs_archive.server
    move = ["--move-to", f"{OUR_AET}:{server.move_port}"] if retrieval == "C-MOVE" else []
    out = tmp_path / "pacs.csv"
    with caplog.at_level(logging.DEBUG):
        assert _infer(tiny_bundle, server.dimse_url, out, *move, *QUICK) == 0
    rows = _rows(out)
    assert len(rows) == 3 and [r.error for r in rows.values() if r.status == "error"] == []
    assert_same_rows(rows, folder_rows)
    text = out.read_text() + caplog.text
    assert not [a for a in PATIENT_ATTRIBUTES if a in text]


@pytest.mark.tool
def test_query_filters_the_studies(pacs_archive: PacsArchive, folder_rows: dict[str, Any],
                                   tiny_bundle: Path, tmp_path: Path) -> None:
    """--query keys go to the study-level C-FIND (a keyword and a hex tag)."""
    study = sorted(folder_rows)[1]
    out = tmp_path / "one.jsonl"
    assert _infer(tiny_bundle, pacs_archive.server.dimse_url, out, *QUICK,
                  "--query", f"StudyInstanceUID={study}", "--query", "00080061=MR") == 0
    assert list(_rows(out)) == [study]


# --- C-STORE of the SEG, once ------------------------------------------------------------
@pytest.mark.tool
def test_store_seg_puts_each_seg_into_the_pacs_once(
        own_orthanc: OrthancServer, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.jsonl"
    args = (own_orthanc.dimse_url, out, "--store-seg", *QUICK)
    assert _infer(tiny_bundle, *args) == 0
    rows = _rows(out)
    segs = {s["SOPInstanceUID"]: s for s in own_orthanc.instances_of("SEG")}
    assert len(segs) == 3
    for row in rows.values():
        uid, _, where = (row.seg_stored or "").partition("@")
        assert where == own_orthanc.dimse_url and uid in segs
        seg = segs[uid]
        assert seg["StudyInstanceUID"] == row.study_uid
        (referenced,) = seg["ReferencedSeriesSequence"]
        assert referenced["SeriesInstanceUID"] == row.series_uid
    assert _infer(tiny_bundle, *args) == 0  # a re-run: every study done, nothing stored
    assert len(own_orthanc.instances_of("SEG")) == 3 and _rows(out) == rows


@pytest.mark.tool
def test_store_seg_to_another_node(pacs_archive: PacsArchive, tiny_bundle: Path,
                                   tmp_path: Path) -> None:
    """--store-seg AET@HOST:PORT: the SEGs go there, not to the source."""
    for other in running_orthanc(tmp_path / "other"):
        node = f"ORTHANC@127.0.0.1:{other.dicom_port}"
        out = tmp_path / "rows.jsonl"
        assert _infer(tiny_bundle, pacs_archive.server.dimse_url, out, "--store-seg", node,
                      *QUICK) == 0
        assert len(other.instances_of("SEG")) == 3
        assert not pacs_archive.server.instances_of("SEG")
        assert all(r.seg_stored and r.seg_stored.endswith(f"@dicom://{node}")
                   for r in _rows(out).values())


# --- a PACS that goes down: error rows naming the step; --retry-errors completes them ----
def _stopping(server: OrthancServer, call: Callable[..., Any], after: bool
              ) -> Callable[..., Any]:
    """``call`` that stops the server on its first use (before it, or after it)."""
    def wrapped(*args: Any) -> Any:
        if not after:
            server.stop(graceful=False)
        try:
            return call(*args)
        finally:
            server.stop(graceful=False)

    return wrapped


@pytest.mark.tool
@pytest.mark.parametrize("stop_at", ["metadata", "retrieve"])
def test_a_pacs_stopped_mid_run_gives_error_rows_and_retry_errors_completes_them(
        stop_at: str, own_orthanc: OrthancServer, folder_rows: dict[str, CaseResult],
        tiny_bundle: Path, tmp_path: Path) -> None:
    from ubc.net import PacsSettings, open_source
    from ubc.scoring import ScoringOptions, score_archive

    settings = PacsSettings(timeout_s=5, retries=1, backoff_s=0.05)
    out = tmp_path / "rows.jsonl"
    source = open_source(own_orthanc.dimse_url, settings)
    pacs: Any = source.pacs
    if stop_at == "metadata":  # the first study's metadata fails, the others' find
        pacs.series_metadata = _stopping(own_orthanc, pacs.series_metadata, after=False)
    else:  # the first study is retrieved, then the PACS goes
        pacs.retrieve = _stopping(own_orthanc, pacs.retrieve, after=True)
    try:
        summary = score_archive(tiny_bundle, source, out, options=ScoringOptions(workers=1))
    finally:
        source.close()
    rows = _rows(out)
    failed = [r for r in rows.values() if r.status == "error"]
    assert len(rows) == 3 and summary.failed == len(failed) >= 2
    steps = {"metadata": ("find", "metadata"), "retrieve": ("retrieve",)}[stop_at]
    for row in failed:
        assert row.error and row.error.startswith(f"study {row.case_id}: ")
        assert row.error.split(": ")[1] in steps, row.error
        assert "after 2 tries" in row.error
    own_orthanc.start()
    assert _infer(tiny_bundle, own_orthanc.dimse_url, out, *QUICK, "--retry-errors") == 0
    assert_same_rows(_rows(out), folder_rows)


# --- the transport alone ----------------------------------------------------------------
@pytest.fixture(params=["garbage", "silent"])
def bad_node(request: pytest.FixtureRequest) -> Iterator[int]:
    """A TCP server on loopback answering every connection with bytes that are not DICOM,
    or with nothing at all (a PACS hung); its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                if request.param == "garbage":
                    conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + bytes(range(256)) * 4)
                else:
                    stop.wait(5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stop.set()
    thread.join()
    listener.close()


def test_a_node_answering_garbage_or_nothing_is_an_error_naming_the_study_and_step(
        bad_node: int) -> None:
    from ubc.net.dimse import DimseError, DimseNode, DimsePacs
    from ubc.net.remote import Retry, with_retries

    pacs = DimsePacs(DimseNode("PACS", "127.0.0.1", bad_node), timeout_s=1)
    start = time.monotonic()
    with pytest.raises(DimseError, match="association"):
        pacs.find_series("1.2.3")
    assert time.monotonic() - start < 5  # bounded by --timeout
    with pytest.raises(UBCInputError, match=r"^study 1\.2\.3: find: DimseError: .*after 2 "):
        with_retries(lambda: pacs.find_series("1.2.3"), Retry(2, 0.01), what="study 1.2.3",
                     step="find")


def test_a_closed_port_is_an_error_at_once() -> None:
    from orthanc import free_port

    from ubc.net.dimse import DimseError, DimseNode, DimsePacs

    pacs = DimsePacs(DimseNode("PACS", "127.0.0.1", free_port()), timeout_s=2)
    with pytest.raises(DimseError, match="check that the PACS is up"):
        list(pacs.find_studies({}))


@pytest.mark.parametrize("text", ["dicom://PACS@host", "dicom://@host:104",
                                  "dicom://A_TITLE_LONGER_THAN_16@host:104",
                                  "dicom://PACS@host:70000", "http://PACS@host:104"])
def test_a_malformed_node_is_refused_with_the_form(text: str) -> None:
    from ubc.net.dimse import DimseNode

    with pytest.raises(ValueError, match="dicom://AET@HOST:PORT"):
        DimseNode.parse(text)


def test_move_to_needs_the_port_to_receive_on() -> None:
    from ubc.net.dimse import MoveDestination

    assert MoveDestination.parse("UBC:11112") == MoveDestination("UBC", 11112)
    with pytest.raises(ValueError, match="AET:PORT"):
        MoveDestination.parse("UBC")


@pytest.mark.tool
@pytest.mark.parametrize("retrieval", ["C-GET", "C-MOVE"])
def test_a_series_over_the_spool_cap_is_refused_at_once(retrieval: str,
                                                      pacs_archive: PacsArchive,
                                                      tmp_path: Path) -> None:
    """The spool's cap is a refusal naming the study (UBCInputError: not retried), not a
    PACS fault, even though the PACS then reports failed sub-operations."""
    from ubc.net.dimse import DimseNode, DimsePacs, MoveDestination
    from ubc.net.remote import Spool

    server = pacs_archive.server
    move = MoveDestination(OUR_AET, server.move_port) if retrieval == "C-MOVE" else None
    pacs = DimsePacs(DimseNode.parse(server.dimse_url), timeout_s=5, move_to=move)
    study = next(pacs.find_studies({}))
    (series,) = [uid for uid, modality in pacs.find_series(study) if modality == "MR"][:1]
    try:
        with pytest.raises(UBCInputError, match=rf"^study {study}: retrieve: .*spool's cap"):
            pacs.retrieve(study, series, Spool(tmp_path, 20_000).open(study))
    finally:
        pacs.close()
