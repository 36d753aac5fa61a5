"""A real Orthanc PACS for the tests of scoring over DICOMweb and DIMSE (issue 29).

``OrthancServer`` starts Debian's ``/usr/sbin/Orthanc`` (packages ``orthanc`` and
``orthanc-dicomweb``) on free loopback ports with its own storage, index and configuration in
a temporary folder, and can be stopped and started again on the same ports and storage (a PACS
that goes down mid-run and comes back). HTTP authentication is OFF (``RemoteAccessAllowed`` is
false, so only loopback clients are answered); pass ``users={"name": "password"}`` to turn it
on. Our AE title ``UBC`` is registered in ``DicomModalities`` at 127.0.0.1:``move_port`` for
C-MOVE (nothing listens there unless a test starts a Storage SCP on it).

Fixtures ``orthanc`` (module scope, an empty server) and ``pacs_archive`` (module scope, the
server loaded with ``ubc-synth --format dicom`` studies plus decoys, and the same files in a
folder); a test module imports their definitions, named apart from the fixtures so that ruff
sees no redefinition: ``from orthanc import orthanc_fixture, pacs_archive_fixture  # noqa:
F401``.
Tests using them are marked ``@pytest.mark.tool``: they skip with the reason where Orthanc is
absent (a failure where ``UBC_REQUIRE_TOOLS=1``).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"
OUR_AET = "UBC"
INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb"
PHANTOM_SHAPE = (64, 64, 24)


def orthanc_missing() -> str | None:
    """Why a real Orthanc cannot run here, or None when it can."""
    missing = [str(p) for p in (ORTHANC, DICOMWEB_PLUGIN) if not p.exists()]
    return f"Orthanc not installed ({', '.join(missing)} absent): {INSTALL_HINT}" \
        if missing else None


def free_port() -> int:
    """A TCP port free on loopback now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancServer:
    """One Orthanc process over ``root`` (config, storage, index, log)."""

    root: Path
    http_port: int
    dicom_port: int
    move_port: int
    users: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, root: Path, users: dict[str, str] | None = None) -> OrthancServer:
        root.mkdir(parents=True, exist_ok=True)
        server = cls(root, free_port(), free_port(), free_port(), users)
        server.write_config()
        return server

    # --- addresses -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def dimse_url(self) -> str:
        """The ``--input`` of scoring over DIMSE."""
        return f"dicom://{ORTHANC_AET}@127.0.0.1:{self.dicom_port}"

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    def write_config(self) -> None:
        config: dict[str, Any] = {
            "Name": "ubc-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": self.users is not None,
            "RegisteredUsers": self.users or {},
            "DicomModalities": {"ubc": [OUR_AET, "127.0.0.1", self.move_port]},
            "DicomScuTimeout": 10,
            "DicomScpTimeout": 10,
            "DicomAssociationCloseDelay": 0,
            "SaveJobs": False,
            "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True,
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    # --- process -------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc and wait until ``/system`` answers (about 1-2 s)."""
        if self.process is not None and self.process.poll() is None:
            return
        log = self.log_path.open("ab")
        # DCMTK inside Debian's Orthanc keeps Nagle's algorithm on unless TCP_NODELAY is set:
        # each DIMSE answer then waits ~40 ms for our delayed ACK (README, "From a PACS")
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.process = subprocess.Popen([str(ORTHANC), str(self.config_path)], cwd=self.root,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: "
                                   f"{self.log_tail()}")
            try:
                self.get("/system")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s: {self.log_tail()}")

    def stop(self, graceful: bool = True) -> None:
        """Terminate Orthanc (SIGTERM, then SIGKILL after 10 s; at once unless
        ``graceful``: a crash, and 2-3 s sooner)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            if graceful:
                self.process.terminate()
            else:
                self.process.kill()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] \
            if self.log_path.exists() else ""

    # --- REST ----------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> Any:
        """One REST call; the answer's JSON (None when empty)."""
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        if self.users:
            name, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{name}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, paths: list[Path]) -> list[str]:
        """POST each file to ``/instances``; the Orthanc ids of the instances."""
        return [self.request("POST", "/instances", p.read_bytes(), "application/dicom")["ID"]
                for p in paths]

    def upload_folder(self, root: Path) -> list[str]:
        """Upload every DICOM file under ``root`` (files that start with the DICM preamble)."""
        return self.upload([p for p in sorted(root.rglob("*")) if _is_dicom(p)])

    def instances_of(self, modality: str | None = None) -> list[dict[str, Any]]:
        """Tags of every instance (``/instances?expand``), optionally of one modality."""
        found = []
        for instance in self.get("/instances?expand"):
            series = self.get(f"/series/{instance['ParentSeries']}")
            if modality is None or series["MainDicomTags"].get("Modality") == modality:
                found.append(self.get(f"/instances/{instance['ID']}/simplified-tags"))
        return found


def _is_dicom(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def require_orthanc() -> None:
    """Skip the calling test, with the reason, where Orthanc is absent."""
    reason = orthanc_missing()
    if reason:
        pytest.skip(reason)


def running_orthanc(root: Path, users: dict[str, str] | None = None) \
        -> Iterator[OrthancServer]:
    """Start a server over ``root``, yield it, stop it (the body of the fixtures)."""
    require_orthanc()
    server = OrthancServer.create(root, users)
    server.start()
    try:
        yield server
    finally:
        server.stop(graceful=False)  # its storage goes with the test


# --- the studies: ubc-synth DICOM studies plus decoys the selection must pass over ------------
def write_decoys(root: Path) -> None:
    """Beside the synth studies under ``root``: a CT series (with pixels) in the first study and
    a Basic Text SR in the second (the synth studies already hold a T1 decoy series)."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    studies = sorted(p for p in root.iterdir() if p.is_dir())
    for study_dir, sop_class, modality in (
            (studies[0], "1.2.840.10008.5.1.4.1.1.2", "CT"),
            (studies[min(1, len(studies) - 1)], "1.2.840.10008.5.1.4.1.1.88.11", "SR")):
        first = next(p for p in sorted((study_dir / "1_FLAIR").iterdir()) if _is_dicom(p))
        study_uid = pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = study_dir / f"9_{modality}" / "IM0001"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 9, 1
        ds.SeriesDescription = f"decoy {modality}"
        ds.PatientID, ds.PatientName = study_dir.name, "Decoy^Patient"
        if modality == "CT":
            ds.Rows = ds.Columns = 8
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
            ds.ImagePositionPatient = [0.0, 0.0, 0.0]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)


def write_pacs_studies(root: Path, cases: int = 3, seed: int = 5) -> Path:
    """``cases`` synth DICOM studies (64 x 64 x 24, one of each storage kind for 3) plus the
    decoys, under ``root``; returns ``root``."""
    from ubc.synth import write_dicom_archive

    write_dicom_archive(root, cases, seed=seed, shape=PHANTOM_SHAPE)
    write_decoys(root)
    return root


@dataclass(frozen=True)
class PacsArchive:
    """A running Orthanc holding the studies that lie in ``folder`` too."""

    server: OrthancServer
    folder: Path


@pytest.fixture(scope="module", name="orthanc")
def orthanc_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An empty real Orthanc for the module (skips where Orthanc is absent)."""
    yield from running_orthanc(tmp_path_factory.mktemp("orthanc"))


@pytest.fixture(scope="module", name="pacs_archive")
def pacs_archive_fixture(tmp_path_factory: pytest.TempPathFactory,
                 orthanc: OrthancServer) -> PacsArchive:
    """The module's Orthanc loaded with three synth studies plus decoys (T1, CT, SR); the same
    files in ``folder`` for the local-folder rows. Read-only: tests that add to the PACS use
    their own server."""
    folder = write_pacs_studies(tmp_path_factory.mktemp("pacs") / "studies")
    orthanc.upload_folder(folder)
    return PacsArchive(orthanc, folder)

