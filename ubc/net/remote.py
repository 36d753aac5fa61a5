"""What a PACS source shares whatever its protocol (DICOMweb or DIMSE).

- ``Pacs``: the four things a protocol does: find studies (paged, streamed), find a study's
  series, read a series' instance headers without pixel data (the metadata), and retrieve
  one series' instances into a spool folder. ``SegStore`` (``ubc.scoring.outputs``) sends
  a SEG back.
- ``RemoteStudy``: a study of the PACS as a ``VolumeReader``: its series chosen from the
  metadata by the same rules as a local DICOM study (``ubc.io.dicom_select``), its
  identity a digest of the study UID and the chosen series' SOPInstanceUIDs (a re-run
  skips an unchanged study and scores again one whose series gained instances), its
  ``load`` retrieving only the chosen series into the spool.
- ``Spool``: one folder per study, capped in bytes while the instances stream in; a
  study's folder lives until its row is written (the SEG re-reads the source headers)
  and is removed then (``release``) unless kept.
- ``with_retries``: bounded retries with exponential backoff; a failure after the last
  try is ``UBCInputError`` naming the study and the step (find, metadata, retrieve,
  store), so the study becomes an error row and the run goes on.
No message here carries a patient attribute or a server's answer body.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from ubc.errors import UBCInputError
from ubc.io.readers import NO_IDENTITY, Identity, SourceColumns
from ubc.io.volume import Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from ubc.io.dicom_select import SeriesInfo, SeriesSelector

__all__ = ["FIND", "METADATA", "RETRIEVE", "STORE", "Pacs", "SpoolFolder", "Spool",
           "RemoteStudy", "Retry", "with_retries", "send_seg", "describe_error",
           "remote_study", "failed_study", "study_path"]

FIND, METADATA, RETRIEVE, STORE = "find", "metadata", "retrieve", "store"
T = TypeVar("T")


class Pacs(Protocol):
    """One PACS node over one protocol. ``where`` names it in rows and messages
    (``http://host/dicom-web``, ``dicom://AET@host:port``; never credentials). Methods
    raise on any failure (``with_retries`` around them decides what to do);
    ``UBCInputError`` is final (not retried)."""

    where: str

    def find_studies(self, query: dict[str, str]) -> Iterator[str]:
        """The StudyInstanceUIDs matching ``query`` (DICOM keyword -> value), in pages."""
        ...

    def find_series(self, study_uid: str) -> list[tuple[str, str]]:
        """``(SeriesInstanceUID, Modality)`` of every series of the study."""
        ...

    def series_metadata(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """The series' instance headers without pixel data (WADO-RS /metadata, or C-FIND
        at IMAGE level)."""
        ...

    def retrieve(self, study_uid: str, series_uid: str, into: SpoolFolder) -> list[Path]:
        """Fetch the series' instances into ``into`` (``SpoolFolder.add``); their files."""
        ...

    def close(self) -> None:
        """Free connections (the run is over)."""
        ...


def describe_error(exc: BaseException) -> str:
    """A short why of a network or protocol failure, without URLs' query strings or
    answer bodies (they may carry patient attributes)."""
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with the pacs extra
        requests = None  # type: ignore[assignment]
    if requests is not None:
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return f"HTTP {exc.response.status_code} {exc.response.reason or ''}".strip()
        if isinstance(exc, requests.Timeout):
            return "timed out (--timeout)"
        if isinstance(exc, requests.ConnectionError):
            return "connection failed (is the PACS up and reachable?)"
    text = str(exc).split("?", 1)[0].strip()[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class Retry:
    """``tries`` attempts in all (1 + ``--retries``), waiting ``backoff_s`` * 2**n between
    them (at most ``max_wait_s``)."""

    tries: int = 4
    backoff_s: float = 0.5
    max_wait_s: float = 10.0


def with_retries(call: Callable[[], T], retry: Retry, *, what: str, step: str) -> T:
    """``call()``, tried again after a failure with backoff; the last failure becomes
    ``UBCInputError("<what>: <step>: <why> (after N tries)")``. A ``UBCInputError`` (a
    refusal, not a fault: a spool over its cap, a malformed answer named already) is
    raised at once."""
    for attempt in range(max(retry.tries, 1)):
        try:
            return call()
        except UBCInputError:
            raise
        except Exception as exc:  # every transport/protocol failure is this step's
            last = exc
        if attempt + 1 < retry.tries:
            time.sleep(min(retry.backoff_s * 2 ** attempt, retry.max_wait_s))
    tries = max(retry.tries, 1)
    raise UBCInputError(f"{what}: {step}: {describe_error(last)} (after {tries} "
                        f"tr{'ies' if tries > 1 else 'y'})") from last


def send_seg(path: Path, send: Callable[[Dataset, str], None], where: str,
             retry: Retry) -> str:
    """Send the SEG file ``path`` with ``send(dataset, what)`` (one try; it raises on a
    failure), retried by ``with_retries``; what the row's ``seg_stored`` says:
    ``<SOPInstanceUID>@<where>``."""
    import pydicom

    ds = pydicom.dcmread(path)
    what = f"SEG {ds.SOPInstanceUID} of study {ds.StudyInstanceUID}"
    with_retries(lambda: send(ds, what), retry, what=what, step=STORE)
    return f"{ds.SOPInstanceUID}@{where}"


class SpoolFolder:
    """One study's spool folder: instances are written through ``add``, which counts
    their bytes and refuses (``UBCInputError`` naming the study) past ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int, study_uid: str) -> None:
        self.path, self.max_bytes, self.study_uid = path, max_bytes, study_uid
        self.bytes = 0
        self._count = 0

    def add(self, data: bytes | Iterable[bytes]) -> Path:
        """Write one instance (its bytes, or chunks of them) as the folder's next file."""
        self._count += 1
        path = self.path / f"{self._count:06d}.dcm"
        with open(path, "wb") as f:
            for chunk in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                self.bytes += len(chunk)
                if self.bytes > self.max_bytes:
                    raise UBCInputError(
                        f"study {self.study_uid}: {RETRIEVE}: the series is larger than the "
                        f"spool's cap of {self.max_bytes / 1e9:g} GB (--spool-max-gb)")
                f.write(chunk)
        return path


class Spool:
    """The spool: ``root/<study>/`` per study being scored. ``root`` None: a temporary
    folder, removed by ``close`` unless ``keep``."""

    def __init__(self, root: Path | None, max_bytes: int, keep: bool = False) -> None:
        if max_bytes <= 0:
            raise ValueError(f"--spool-max-gb must be > 0, got {max_bytes / 1e9:g}")
        self._temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="ubc-spool-")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.keep = max_bytes, keep

    def _path(self, study_uid: str) -> Path:
        from ubc.scoring.discover import safe_path

        return safe_path(self.root, study_uid, "")

    def open(self, study_uid: str) -> SpoolFolder:
        """An empty folder for the study (what an earlier try left is removed)."""
        path = self._path(study_uid)
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return SpoolFolder(path, self.max_bytes, study_uid)

    def release(self, study_uid: str) -> None:
        """The study's row is written: its folder goes (unless ``keep``)."""
        if not self.keep:
            shutil.rmtree(self._path(study_uid), ignore_errors=True)

    def close(self) -> None:
        if self._temporary and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def study_path(where: str, study_uid: str) -> Path:
    """What the row's ``path`` column says of a PACS study: ``host:port/.../studies/UID``
    (no scheme: a ``Path`` folds ``//``)."""
    return Path(where.split("://", 1)[-1]) / "studies" / study_uid


@dataclass(frozen=True, eq=False)
class RemoteStudy:
    """A PACS study as a ``VolumeReader`` (see the module docstring). ``chosen`` None and
    ``error`` set when no series qualifies or the metadata could not be read."""

    study_uid: str
    chosen: SeriesInfo | None
    flags: tuple[str, ...]
    error: str | None
    digest: str | None
    pacs: Pacs = field(repr=False)
    spool: Spool = field(repr=False)
    retry: Retry = field(default_factory=Retry)

    def identity(self) -> Identity:
        return NO_IDENTITY if self.digest is None else (None, None, self.digest)

    def load(self) -> Volume:
        from ubc.io.dicom import load_series

        if self.error is not None or self.chosen is None:
            raise UBCInputError(self.error or f"study {self.study_uid}: no series chosen")
        chosen, what = self.chosen, f"study {self.study_uid}"

        def fetch() -> list[Path]:
            return self.pacs.retrieve(self.study_uid, chosen.series_uid,
                                      self.spool.open(self.study_uid))

        files = with_retries(fetch, self.retry, what=what, step=RETRIEVE)
        if not files:
            raise UBCInputError(f"{what}: {RETRIEVE}: the PACS sent no instance of series "
                                f"{chosen.summary()}")
        volume, _ = load_series(files, name=f"{what} series {chosen.summary()}")
        return volume

    def columns(self) -> SourceColumns:
        chosen = self.chosen
        if chosen is None:
            return SourceColumns(study_uid=self.study_uid)
        return SourceColumns(self.study_uid, chosen.series_uid, chosen.description)


def _digest(study_uid: str, sop_uids: Iterable[str]) -> str:
    sha = hashlib.sha1(study_uid.encode())
    for uid in sorted(sop_uids):
        sha.update(b"\0" + uid.encode())
    return sha.hexdigest()


def _headers(study_uid: str, series_uid: str, datasets: Sequence[Dataset]) -> list:
    """Instance headers (``ubc.io.dicom``) of metadata datasets; their ``path`` is
    ``<series>/<SOPInstanceUID>`` (no file: what selection needs is the header)."""
    from pydicom.dataset import FileMetaDataset

    from ubc.io.dicom import _header_of

    headers = []
    for ds in datasets:
        if not hasattr(ds, "file_meta"):
            ds.file_meta = FileMetaDataset()
        if not ds.get("StudyInstanceUID"):
            ds.StudyInstanceUID = study_uid
        if not ds.get("SeriesInstanceUID"):
            ds.SeriesInstanceUID = series_uid
        header = _header_of(ds, Path(series_uid) / str(ds.get("SOPInstanceUID", "")))
        if header is not None and header.study_uid == study_uid:
            headers.append(header)
    return headers


def remote_study(pacs: Pacs, spool: Spool, retry: Retry, study_uid: str,
                 selector: SeriesSelector | None) -> tuple[RemoteStudy, str]:
    """The study with its series chosen from the PACS's metadata, and its patient key
    (PatientID + StudyDate, for ``--case-id patient`` only). Metadata is read for MR
    series only (the others cannot be chosen). A failure after retries is a study whose
    ``error`` names the step (its row says so)."""
    from ubc.io.dicom_select import study_from_headers

    what = f"study {study_uid}"
    try:
        series = with_retries(lambda: pacs.find_series(study_uid), retry, what=what,
                              step=FIND)
        headers = []
        for series_uid, modality in series:
            if modality in ("MR", ""):
                datasets = with_retries(
                    lambda s=series_uid: pacs.series_metadata(study_uid, s),  # type: ignore[misc]
                    retry, what=what, step=METADATA)
                try:
                    headers += _headers(study_uid, series_uid, datasets)
                except Exception as exc:
                    raise UBCInputError(f"{what}: {METADATA}: malformed "
                                        f"({describe_error(exc)})") from exc
    except UBCInputError as exc:
        return failed_study(pacs, spool, retry, study_uid, str(exc)), ""
    if not headers:
        kinds = ", ".join(sorted({m or "?" for _, m in series})) or "none"
        return failed_study(pacs, spool, retry, study_uid, f"{what}: no MR series (series "
                            f"modalities: {kinds})", digest=_digest(study_uid, [])), ""
    study = study_from_headers(study_uid, headers, selector)
    chosen = study.chosen
    sops = [p.name for p in chosen.files] if chosen is not None else []
    if chosen is not None:  # the pseudo paths served the choice; only their UIDs matter
        from dataclasses import replace

        chosen = replace(chosen, files=())
    error = None if study.error is None else f"{what}: {study.error}"
    return RemoteStudy(study_uid, chosen, study.flags, error, _digest(study_uid, sops), pacs,
                       spool, retry), study.patient_key


def failed_study(pacs: Pacs, spool: Spool, retry: Retry, study_uid: str, error: str,
                 digest: str | None = None) -> RemoteStudy:
    """A study that cannot be scored, and why (its row is an error row)."""
    return RemoteStudy(study_uid, None, (), error, digest, pacs, spool, retry)
