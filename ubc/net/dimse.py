"""A PACS over DIMSE (``--input dicom://CALLED_AET@HOST:PORT``, issue 29), with pynetdicom.

- find: C-FIND at STUDY level (the ``--query`` filters as matching keys) and SERIES level.
- metadata: C-FIND at IMAGE level asking for every attribute series selection reads
  (``ubc.io.dicom.read_header``: Modality, SeriesDescription, ProtocolName, ImageType,
  ScanningSequence, SequenceName, InversionTime, EchoTime, orientation, NumberOfFrames, Rows,
  ...). A PACS that answers only its indexed attributes at IMAGE level leaves the others
  empty: they are then taken from the SERIES-level answer (the same C-FIND keys), so the
  selection sees the series' values instead. Orthanc 1.10 answers them all at IMAGE level
  (it reads each instance's stored tags), the Enhanced MR orientation inside
  SharedFunctionalGroupsSequence included.
- retrieve: C-GET of the chosen series on our own association (no inbound port needed; the
  storage SOP classes are offered with the SCP role), or C-MOVE to ``--move-to AET:PORT``:
  the PACS sends the instances to AE title ``AET``, which it must know as this host and
  ``PORT``, where a Storage SCP of ours listens while the source is open.
- store: C-STORE of a SEG (``DimseStore``, a ``SegStore``), returning its SOPInstanceUID.
Every failure (no association, a rejection, an abort, a time-out, a failure status, an
answer that cannot be decoded) raises ``DimseError``; ``ubc.net.remote.with_retries``
retries it with backoff and then names the study and the step. No message carries a patient
attribute: PatientName and PatientBirthDate are never asked for.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ubc.net.remote import Retry, send_seg

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from pynetdicom.association import Association
    from pynetdicom.events import Event

    from ubc.net.remote import SpoolFolder
    from ubc.net.sources import PacsSettings

__all__ = ["DEFAULT_AE_TITLE", "DimseError", "DimseNode", "MoveDestination", "DimsePacs",
           "DimseStore", "open_pacs", "open_store"]

DEFAULT_AE_TITLE = "UBC"
INSTALL_HINT = "pip install ubc[pacs] (pynetdicom)"
#: IMAGE-level return keys: what ``ubc.io.dicom`` reads to group and choose series
_IMAGE_KEYS = ("SOPClassUID", "SOPInstanceUID", "Modality", "SeriesDescription",
               "ProtocolName", "SequenceName", "ScanningSequence", "InversionTime", "EchoTime",
               "ImageType", "SeriesNumber", "NumberOfFrames", "ImageOrientationPatient", "Rows",
               "PatientID", "StudyDate")
#: SERIES-level return keys (also the fallback of IMAGE-level answers that lack them)
_SERIES_KEYS = ("Modality", "SeriesDescription", "ProtocolName", "SequenceName",
                "ScanningSequence", "InversionTime", "EchoTime", "ImageType", "SeriesNumber",
                "ImageOrientationPatient")
_PENDING = (0xFF00, 0xFF01)
#: Study Root Query/Retrieve Information Models
_FIND, _MOVE, _GET = (f"1.2.840.10008.5.1.4.1.2.2.{n}" for n in (1, 2, 3))
_NODE = re.compile(r"^dicom://([^@/\s]{1,16})@([^:/\s]+):(\d{1,5})/?$")


class DimseError(Exception):
    """A DIMSE exchange failed (retried; the last one becomes the study's error)."""


@dataclass(frozen=True)
class DimseNode:
    """A remote DICOM node: its (called) AE title, host and port."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> DimseNode:
        """``dicom://AET@HOST:PORT``; ValueError naming the expected form otherwise."""
        m = _NODE.match(url.strip())
        if m is None or not 0 < int(m.group(3)) < 65536:
            raise ValueError(f"{url!r} is not a DICOM node: expected dicom://AET@HOST:PORT "
                             "(AE title of at most 16 characters)")
        return cls(m.group(1), m.group(2), int(m.group(3)))

    def __str__(self) -> str:
        return f"dicom://{self.aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class MoveDestination:
    """``--move-to AET:PORT``: the AE title the PACS moves to, and the port our Storage SCP
    listens on (all interfaces) to receive what it moves."""

    aet: str
    port: int

    @classmethod
    def parse(cls, text: str) -> MoveDestination:
        aet, _, port = text.strip().rpartition(":")
        if not aet or len(aet) > 16 or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--move-to {text!r}: expected AET:PORT, the AE title the PACS "
                             "knows for this host and the port to receive on")
        return cls(aet, int(port))


def _pynetdicom() -> Any:
    try:
        import pynetdicom
    except ImportError as exc:
        raise ImportError(f"a DIMSE source needs pynetdicom: {INSTALL_HINT}") from exc
    return pynetdicom


def _status(status: Dataset | None, what: str) -> int:
    """The status code of an answer; DimseError when there is none (time-out, abort)."""
    if status is None or "Status" not in status:
        raise DimseError(f"{what}: no answer (timed out or the association was lost)")
    return int(status.Status)


def _failed(code: int, what: str) -> DimseError:
    return DimseError(f"{what}: failed with status 0x{code:04X}")


def _without_empty(ds: Dataset) -> Dataset:
    """The answer without the keys left empty (an SR answered ``Rows`` empty is no image)."""
    for element in list(ds):
        if element.VR != "SQ" and element.value in (None, "", b""):
            del ds[element.tag]
    return ds


@functools.cache
def _ae_class() -> Any:
    """pynetdicom's AE, keeping each association's socket: pynetdicom 3.0 drops it unclosed
    when the connection fails (refused, or a peer answering bytes that are not DICOM: its
    ``_shutdown_socket`` stops at the ``shutdown`` of a socket not connected)."""
    pynetdicom = _pynetdicom()

    class ClosingAE(pynetdicom.AE):  # type: ignore[misc, name-defined]
        def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> Any:
            sock = super()._create_socket(assoc, address, tls_args)
            assoc.ubc_socket = sock.socket
            return sock

    return ClosingAE


def _close_socket(assoc: Association) -> None:
    raw = getattr(assoc, "ubc_socket", None)
    if raw is not None:
        raw.close()


def _query(level: str, **keys: Any) -> Dataset:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _set_key(ds: Dataset, key: str, value: str) -> None:
    """A ``--query`` matching key (``StudyDate`` or ``00080020``) with its dictionary VR."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.tag import Tag

    tag = tag_for_keyword(key)
    tag = Tag(int(key, 16)) if tag is None else Tag(tag)
    ds.add_new(tag, dictionary_VR(tag), value)


def _orientation_key() -> Dataset:
    """SharedFunctionalGroupsSequence > PlaneOrientationSequence > ImageOrientationPatient
    (the orientation of an Enhanced MR instance)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    plane = Dataset()
    plane.ImageOrientationPatient = None
    group = Dataset()
    group.PlaneOrientationSequence = Sequence([plane])
    return group


@dataclass
class _Receipt:
    """Where retrieved instances of one series go, and what went wrong there."""

    folder: SpoolFolder
    files: list[Path] = field(default_factory=list)
    error: Exception | None = None

    def store(self, event: Event) -> int:
        """One C-STORE sub-operation into the spool folder (0xA700 when refused)."""
        try:
            self.files.append(self.folder.add(event.encoded_dataset()))
            return 0x0000
        except Exception as exc:  # the spool's cap, a full disk: ``done`` reports it
            self.error = self.error or exc
            return 0xA700

    def wait(self, answers: Iterator[tuple[Dataset, Dataset | None]], what: str) -> None:
        """Wait for the end of a C-GET/C-MOVE; DimseError when it failed or lost instances,
        unless we refused them (the spool's cap: that error is the reason)."""
        try:
            _sub_operations(answers, what)
        except DimseError:
            self.done()
            raise

    def done(self) -> list[Path]:
        if self.error is not None:
            raise self.error
        return self.files


#: a requested presentation context: abstract syntax, transfer syntaxes (None: defaults)
_Context = tuple[str, "list[str] | None"]


@dataclass
class DimsePacs:
    """A PACS over DIMSE (see the module docstring): ``ubc.net.remote.Pacs``.
    ``timeout_s`` bounds connecting, association negotiation, each DIMSE message and
    network silence."""

    node: DimseNode
    ae_title: str = DEFAULT_AE_TITLE
    timeout_s: float = 30.0
    move_to: MoveDestination | None = None
    _receiving: dict[str, _Receipt] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _server: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < len(self.ae_title) <= 16:
            raise ValueError(f"--ae-title {self.ae_title!r}: 1 to 16 characters")

    @property
    def where(self) -> str:
        return str(self.node)

    # --- associations ------------------------------------------------------------------
    def _ae(self) -> Any:
        ae = _ae_class()(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        return ae

    @contextmanager
    def _association(self, contexts: list[_Context], what: str, *,
                     roles: list[Any] | None = None, handlers: list[Any] | None = None
                     ) -> Iterator[Association]:
        ae = self._ae()
        for abstract, syntaxes in contexts:
            ae.add_requested_context(abstract, *([syntaxes] if syntaxes else []))
        assoc = ae.associate(self.node.host, self.node.port, ae_title=self.node.aet,
                             ext_neg=roles or None, evt_handlers=handlers or None)
        if not assoc.is_established:
            _close_socket(assoc)
            why = "rejected" if assoc.is_rejected else \
                "not established (refused, timed out or aborted: check that the PACS is up)"
            raise DimseError(f"{what}: association with {self.node} {why}")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()
            _close_socket(assoc)

    def _find(self, query: Dataset, what: str) -> list[Dataset]:
        """The identifiers of a C-FIND (Study Root), all of them or DimseError."""
        found = []
        with self._association([(_FIND, None)], what) as assoc:
            for status, identifier in assoc.send_c_find(query, _FIND):
                code = _status(status, what)
                if code in _PENDING:
                    if identifier is None:
                        raise DimseError(f"{what}: an answer that cannot be decoded")
                    found.append(_without_empty(identifier))
                elif code != 0x0000:
                    raise _failed(code, what)
        return found

    # --- Pacs ----------------------------------------------------------------------------
    def find_studies(self, query: dict[str, str]) -> Iterator[str]:
        """StudyInstanceUIDs matching ``query`` (keyword or hex tag -> matching value)."""
        identifier = _query("STUDY", StudyInstanceUID="")
        for key, value in query.items():
            _set_key(identifier, key, value)
        answers = self._find(identifier, "C-FIND studies")
        return iter(sorted({str(a.StudyInstanceUID) for a in answers
                            if "StudyInstanceUID" in a}))

    def _series(self, study_uid: str) -> list[Dataset]:
        keys = dict.fromkeys(_SERIES_KEYS)
        return self._find(_query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="",
                                 **keys), "C-FIND series")

    def find_series(self, study_uid: str) -> list[tuple[str, str]]:
        return [(str(s.SeriesInstanceUID), str(s.get("Modality", "")))
                for s in self._series(study_uid) if "SeriesInstanceUID" in s]

    def series_metadata(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """The instances' selection attributes (C-FIND IMAGE level), those the PACS left
        empty taken from its SERIES-level answer."""
        keys = dict.fromkeys(_IMAGE_KEYS)
        query = _query("IMAGE", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                       **keys)
        from pydicom.sequence import Sequence

        query.SharedFunctionalGroupsSequence = Sequence([_orientation_key()])
        instances = self._find(query, "C-FIND instances")
        series = [s for s in self._series(study_uid)
                  if s.get("SeriesInstanceUID") == series_uid]
        for instance in instances:
            for keyword in _SERIES_KEYS if series else ():
                if keyword not in instance and keyword in series[0]:
                    setattr(instance, keyword, series[0][keyword].value)
        return instances

    def retrieve(self, study_uid: str, series_uid: str, into: SpoolFolder) -> list[Path]:
        """The series' instances, by C-GET (or C-MOVE with ``move_to``), into ``into``."""
        if self.move_to is not None:
            return self._move(study_uid, series_uid, into)
        return self._get(study_uid, series_uid, into)

    # --- C-GET -------------------------------------------------------------------------
    def _get(self, study_uid: str, series_uid: str, into: SpoolFolder) -> list[Path]:
        pynetdicom = _pynetdicom()
        # 120 storage classes + Get: within the 128 contexts an association may propose
        storage = [c.abstract_syntax for c in pynetdicom.StoragePresentationContexts]
        roles = [pynetdicom.build_role(uid, scp_role=True) for uid in storage]
        receipt = _Receipt(into)
        handlers = [(pynetdicom.evt.EVT_C_STORE, receipt.store)]
        contexts: list[_Context] = [(_GET, None), *((uid, None) for uid in storage)]
        query = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        with self._association(contexts, "C-GET", roles=roles, handlers=handlers) as assoc:
            receipt.wait(assoc.send_c_get(query, _GET), "C-GET")
        return receipt.done()

    # --- C-MOVE ------------------------------------------------------------------------
    def _move(self, study_uid: str, series_uid: str, into: SpoolFolder) -> list[Path]:
        destination = self.move_to
        assert destination is not None
        self._listen(destination)
        receipt = _Receipt(into)
        with self._lock:
            self._receiving[series_uid] = receipt
        what = f"C-MOVE to {destination.aet}"
        query = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        try:
            with self._association([(_MOVE, None)], what) as assoc:
                receipt.wait(assoc.send_c_move(query, destination.aet, _MOVE), what)
        finally:
            with self._lock:
                self._receiving.pop(series_uid, None)
        return receipt.done()

    def _listen(self, destination: MoveDestination) -> None:
        """Start the Storage SCP of ``--move-to`` once (it receives every moved series)."""
        with self._lock:
            if self._server is not None:
                return
            pynetdicom = _pynetdicom()
            ae = self._ae()
            ae.ae_title = destination.aet
            ae.supported_contexts = pynetdicom.StoragePresentationContexts
            handlers = [(pynetdicom.evt.EVT_C_STORE, self._on_moved)]
            try:
                self._server = ae.start_server(("", destination.port), block=False,
                                               evt_handlers=handlers)
            except OSError as exc:
                raise DimseError(f"--move-to: cannot listen on port {destination.port} "
                                 f"({exc.strerror})") from exc

    def _on_moved(self, event: Event) -> int:
        series = str(event.dataset.get("SeriesInstanceUID", ""))
        with self._lock:
            receipt = self._receiving.get(series)
        return 0xC000 if receipt is None else receipt.store(event)  # 0xC000: not asked for

    def close(self) -> None:
        """Stop the move SCP (if it was started)."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()


def _sub_operations(answers: Iterator[tuple[Dataset, Dataset | None]], what: str) -> None:
    """Wait for the end of a C-GET/C-MOVE; DimseError when it failed or lost instances."""
    for status, _identifier in answers:
        code = _status(status, what)
        if code in _PENDING:
            continue
        failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
        if code != 0x0000 or failed:
            detail = f" ({failed} instances not sent)" if failed else ""
            raise DimseError(f"{what}: failed with status 0x{code:04X}{detail}")


@dataclass(frozen=True)
class DimseStore:
    """``--store-seg dicom://AET@HOST:PORT`` (or the DIMSE source itself): C-STORE of a SEG
    (``ubc.scoring.outputs.SegStore``); picklable."""

    node: DimseNode
    ae_title: str = DEFAULT_AE_TITLE
    timeout_s: float = 30.0
    retry: Retry = field(default_factory=Retry)

    @property
    def where(self) -> str:
        return str(self.node)

    def send(self, path: Path) -> str:
        """C-STORE ``path``; ``<SOPInstanceUID>@<node>``. ``UBCInputError`` naming the SEG
        and the step when refused or unreachable after the retries."""
        return send_seg(path, self._store, self.where, self.retry)

    def _store(self, ds: Dataset, what: str) -> None:
        syntaxes = list(dict.fromkeys([str(ds.file_meta.TransferSyntaxUID),
                                       "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]))
        pacs = DimsePacs(self.node, self.ae_title, self.timeout_s)
        with pacs._association([(str(ds.SOPClassUID), syntaxes)], "C-STORE") as assoc:
            code = _status(assoc.send_c_store(ds), "C-STORE")
        if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:  # warnings: stored, coerced
            raise _failed(code, "C-STORE")


def open_pacs(url: str, settings: PacsSettings) -> DimsePacs:
    """The DIMSE node at ``url`` (``dicom://AET@HOST:PORT``) with ``settings``' AE title,
    time-out and ``--move-to``."""
    move_to = MoveDestination.parse(settings.move_to) if settings.move_to else None
    return DimsePacs(DimseNode.parse(url), settings.ae_title, settings.timeout_s, move_to)


def open_store(url: str, settings: PacsSettings) -> DimseStore:
    """C-STORE to the DIMSE node at ``url`` (``dicom://AET@HOST:PORT``)."""
    return DimseStore(DimseNode.parse(url), settings.ae_title, settings.timeout_s,
                      settings.retry)
