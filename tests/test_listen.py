"""The DICOM node ``ubc-listen`` (issue 30): a real sender (dcmtk's ``storescu``) sends
synth studies (FLAIR + T1 decoy, a CT series, an SR) and a CT-only study to a ``ubc-listen``
process on free loopback ports, which forwards each SEG to a real Orthanc
(tests/orthanc.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from orthanc import (  # noqa: F401  (the fixture orthanc)
    ORTHANC_AET,
    OrthancServer,
    _is_dicom,
    free_port,
    orthanc_fixture,
    write_pacs_studies,
)

from ubc.cli.infer import main as ubc_infer
from ubc.scoring import read_results
from ubc.scoring.result import CaseResult

STORESCU, ECHOSCU = Path("/usr/bin/storescu"), Path("/usr/bin/echoscu")
SENDER = "STORESCU"
SAME = ("status", "error", "predicted_class", "study_uid", "series_uid", "series_description",
        "flags", "slices_total", "slices_scored", "slices_used")
PATIENT_ATTRIBUTES = ("Phantom^Synthetic", "Decoy^Patient", "CT^Patient")
STARTUP_S, SCORING_S = 180, 240  # two shared cores under a CI run: generous bounds


def _dcmtk_missing() -> str | None:
    """Why dcmtk's storescu cannot run here (``storescu`` on PATH may be pynetdicom's)."""
    if not STORESCU.exists() or not ECHOSCU.exists():
        return "dcmtk not installed (/usr/bin/storescu absent): apt-get install dcmtk"
    version = subprocess.run([str(STORESCU), "--version"], capture_output=True, text=True)
    return None if "dcmtk" in version.stdout.lower() else f"{STORESCU} is not dcmtk's"


def store(port: int, *folders: Path, aet: str = SENDER) -> subprocess.CompletedProcess[str]:
    """storescu every DICOM file under ``folders`` (the study folders of each one that
    is an archive root) to the node, on one association."""
    folders = tuple(f for folder in folders for f in (
        sorted(p for p in folder.iterdir() if p.is_dir())
        if (folder / "ubc-synth.json").exists() else [folder]))
    # TCP_NODELAY: dcmtk keeps Nagle's algorithm on otherwise (40 ms per instance)
    return subprocess.run([str(STORESCU), "-aet", aet, "-aec", "UBC", "+sd", "+r",
                           "127.0.0.1", str(port), *map(str, folders)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TCP_NODELAY": "1"})


def write_ct_study(root: Path, slices: int = 3) -> Path:
    """A study holding one CT series (routed to the node by mistake)."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    study, series = generate_uid(), generate_uid()
    folder = root / "CT_0000" / "1_CT"
    folder.mkdir(parents=True)
    for n in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = \
            CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"IM{n:04d}"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, n + 1
        ds.PatientID, ds.PatientName = "CT0000", "CT^Patient"
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.ImagePositionPatient = [0.0, 0.0, float(n)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelData = np.zeros((16, 16), np.int16).tobytes()
        ds.save_as(folder / f"IM{n:04d}", enforce_file_format=True)
    return root / "CT_0000"


class Listener:
    """One ``ubc-listen`` process (started again on the same arguments by ``start``)."""

    def __init__(self, tmp: Path, bundle: Path, *extra: str) -> None:
        self.port = free_port()
        self.out, self.spool, self.log = tmp / "rows.csv", tmp / "spool", tmp / "listen.log"
        self.args = [sys.executable, "-m", "ubc.cli.listen", "--model", str(bundle),
                     "--out", str(self.out), "--spool", str(self.spool), "--port",
                     str(self.port), "--backend", "torch", "--workers", "1", *extra]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Listener:
        start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_S
        while "listening as" not in self.log.read_text()[start:]:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"not listening: {self.log.read_text()}"
            time.sleep(0.2)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(60)
        self.process = None
        return code

    def rows(self) -> list[CaseResult]:
        return read_results(self.out) if self.out.exists() else []

    def wait_rows(self, n: int) -> list[CaseResult]:
        deadline = time.monotonic() + SCORING_S
        while len(self.rows()) < n:
            assert self.process is not None and self.process.poll() is None, \
                self.log.read_text()
            assert time.monotonic() < deadline, f"{len(self.rows())} rows: " \
                f"{self.log.read_text()[-3000:]}"
            time.sleep(0.2)
        return self.rows()

    def spooled(self) -> list[Path]:
        return sorted(p for p in self.spool.rglob("*") if p.is_file())

    def wait_spool_empty(self) -> None:
        """A study's folder goes right after its row is written."""
        deadline = time.monotonic() + 30
        while self.spooled() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.spooled() == []


@pytest.fixture
def listeners() -> Iterator[list[Listener]]:
    """The listeners a test started, killed at its end whatever happened (skips, with the
    reason, where dcmtk is absent)."""
    reason = _dcmtk_missing()
    if reason:
        pytest.skip(reason)
    started: list[Listener] = []
    yield started
    for listener in started:
        if listener.process is not None:
            listener.process.kill()
            listener.process.wait(30)


def _segs(orthanc: OrthancServer) -> dict[str, dict]:
    return {s["SOPInstanceUID"]: s for s in orthanc.instances_of("SEG")}


# --- one row per study, as ubc-infer's; the SEG in the PACS; who may call ----------------
@pytest.mark.tool
def test_studies_sent_are_scored_like_ubc_infer_and_their_segs_reach_the_pacs(
        orthanc: OrthancServer, tiny_bundle: Path, tmp_path: Path,
        listeners: list[Listener]) -> None:
    studies = write_pacs_studies(tmp_path / "studies", cases=3)
    write_ct_study(studies)
    expected_out = tmp_path / "infer.csv"
    assert ubc_infer(["--model", str(tiny_bundle), "--input", str(studies), "--out",
                      str(expected_out), "--backend", "torch", "--quiet"]) == 1  # the CT
    expected = {r.case_id: r for r in read_results(expected_out)}
    metrics_port = free_port()
    node = Listener(tmp_path, tiny_bundle, "--study-timeout", "1", "--allow", SENDER,
                    "--forward", f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}",
                    "--metrics-port", str(metrics_port))
    listeners.append(node.start())
    echo = subprocess.run([str(ECHOSCU), "-aet", SENDER, "-aec", "UBC", "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    refused = store(node.port, studies, aet="INTRUDER")
    assert refused.returncode != 0 and "Rejected" in refused.stderr + refused.stdout
    assert node.spooled() == []
    sent = store(node.port, studies)
    assert sent.returncode == 0, sent.stderr
    rows = {r.case_id: r for r in node.wait_rows(4)}

    assert rows.keys() == expected.keys() and len(node.rows()) == 4
    for case_id, row in rows.items():
        local = expected[case_id]
        assert {k: getattr(row, k) for k in SAME} == {k: getattr(local, k) for k in SAME}
        if local.p_hgg is not None:
            assert row.p_hgg == pytest.approx(local.p_hgg, abs=1e-6)
    (ct,) = [r for r in rows.values() if r.status == "error"]
    assert "no MR series" in (ct.error or "") and "CT" in (ct.error or "")
    assert ct.seg_stored is None
    segs = _segs(orthanc)
    for row in rows.values():
        if row.status == "error":
            continue
        assert row.output_error is None
        uid, _, where = (row.seg_stored or "").partition("@")
        seg = segs[uid]
        assert where == f"dicom://{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}"
        assert seg["StudyInstanceUID"] == row.study_uid
        (referenced,) = seg["ReferencedSeriesSequence"]
        assert referenced["SeriesInstanceUID"] == row.series_uid  # the FLAIR, not the T1
    node.wait_spool_empty()  # every study done: its files gone (the CT's too)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as answer:
        metrics = answer.read().decode()
    assert "ubc_listen_studies_scored_total 4.0" in metrics
    assert "ubc_listen_studies_forwarded_total 3.0" in metrics
    assert node.stop() == 0
    text = node.log.read_text() + node.out.read_text()
    assert not [a for a in PATIENT_ATTRIBUTES if a in text]


# --- exactly once across kill -9 ------------------------------------------------------------
@pytest.mark.tool
def test_kill_9_while_scoring_then_restart_scores_and_forwards_each_study_once(
        orthanc: OrthancServer, tiny_bundle: Path, tmp_path: Path,
        listeners: list[Listener]) -> None:
    studies = write_pacs_studies(tmp_path / "studies", cases=3, seed=11)
    node = Listener(tmp_path, tiny_bundle, "--study-timeout", "1",
                    "--forward", f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}")
    listeners.append(node.start())
    assert store(node.port, studies).returncode == 0
    node.wait_rows(1)
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    rows_at_kill = len(node.rows())
    node.start()
    rows = node.wait_rows(3)
    time.sleep(1.0)  # nothing more comes
    assert len(node.rows()) == 3 and len({r.case_id for r in rows}) == 3, rows_at_kill
    assert all(r.status != "error" and r.output_error is None for r in rows)
    study_uids = {r.study_uid for r in rows}
    per_study = Counter(s["StudyInstanceUID"] for s in _segs(orthanc).values()
                        if s["StudyInstanceUID"] in study_uids)
    assert per_study == dict.fromkeys(study_uids, 1)
    node.wait_spool_empty()
    assert node.stop() == 0


# --- a full spool refuses, loses nothing; a malformed dataset; SIGTERM ---------------------
@pytest.mark.tool
def test_full_spool_answers_out_of_resources_and_keeps_what_it_received(
        tiny_bundle: Path, tmp_path: Path, listeners: list[Listener]) -> None:
    studies = write_pacs_studies(tmp_path / "studies", cases=2, seed=13)
    first, second = sorted(p for p in studies.iterdir() if p.is_dir())
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    node = Listener(tmp_path, tiny_bundle, "--study-timeout", "600",
                    "--spool-max-gb", str(size * 1.3 / 1e9))
    listeners.append(node.start())
    assert store(node.port, first).returncode == 0
    kept = {p: p.read_bytes() for p in node.spooled()}
    images = [p for p in first.rglob("*") if _is_dicom(p) and not p.parent.name.endswith("SR")]
    assert len(kept) == len(images)
    store(node.port, second)  # refused part-way
    assert "out of resources" in node.log.read_text()
    after = node.spooled()
    assert set(kept) <= set(after) and len(kept) < len(after) < len(kept) + 24
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert _malformed_status(node.port) == 0xC210
    assert node.stop() == 0  # SIGTERM: nothing complete yet, everything stays spooled
    assert node.spooled() == after and node.rows() == []


def _malformed_status(port: int) -> int:
    """The status a C-STORE of a dataset without a StudyInstanceUID gets."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    from pynetdicom import AE

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.Modality = "MR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="UBC")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_read_instance_refuses_what_cannot_be_kept(tmp_path: Path) -> None:
    """Cut short, read in the wrong transfer syntax, or without its UIDs: ``Malformed``."""
    from ubc.net.listen_spool import Malformed, read_instance
    from ubc.synth import write_dicom_archive

    write_dicom_archive(tmp_path, 1, seed=5, shape=(16, 16, 8))
    path = next(p for p in sorted(tmp_path.rglob("IM*")) if "FLAIR" in str(p))
    data = path.read_bytes()
    assert read_instance(data).study_uid
    big_endian = data.replace(b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.2", 1)
    for damaged in (data[: len(data) - 40], data[:300], big_endian):
        with pytest.raises(Malformed):
            read_instance(damaged)
