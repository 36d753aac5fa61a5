"""A PACS as the archive of a run: ``--input http(s)://HOST/dicom-web`` (DICOMweb,
``ubc.net.dicomweb``) or ``--input dicom://CALLED_AET@HOST:PORT`` (DIMSE,
``ubc.net.dimse``), its settings (``PacsSettings``), the source ``score_archive`` takes
(``PacsSource``: one case per matching study, ``ubc.net.remote.RemoteStudy``), and where
``--store-seg`` sends the SEGs (``open_store``).

A protocol module offers ``open_pacs(url, settings) -> Pacs`` and ``open_store(url,
settings) -> SegStore``; this module only picks the module by the URL's scheme.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ubc.errors import UBCInputError
from ubc.net.remote import FIND, Pacs, Retry, Spool, remote_study, study_path, with_retries
from ubc.scoring.discover import CASE_ID_MODES, Case, Discovery

if TYPE_CHECKING:
    from ubc.io.dicom_select import SeriesSelector
    from ubc.scoring.outputs import SegStore

__all__ = ["PacsSettings", "PacsSource", "is_pacs_url", "parse_query", "read_auth",
           "open_pacs", "open_source", "open_store"]

_SCHEMES = {"http": "dicomweb", "https": "dicomweb", "dicom": "dimse"}
_NODE = re.compile(r"^[^@/\s]{1,16}@[^@/\s:]+:\d{1,5}$")  # AET@HOST:PORT
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


@dataclass(frozen=True)
class PacsSettings:
    """How to talk to a PACS. ``query``: QIDO/C-FIND filters (DICOM keyword or tag ->
    value); ``auth``: a bearer token or ``(user, password)`` (DICOMweb); ``ca_bundle``:
    the CA certificates TLS trusts (default: the system's; verification is always on);
    ``timeout_s`` per request; ``retries`` after a failure, with backoff from
    ``backoff_s``; the spool (``spool`` folder, a temporary one when None; its cap per
    study ``spool_max_gb``; ``keep_spool``); DIMSE: our ``ae_title`` and ``move_to``
    (C-MOVE to that AE instead of C-GET); ``page_size``: studies per QIDO page."""

    query: tuple[tuple[str, str], ...] = ()
    auth: str | tuple[str, str] | None = None
    ca_bundle: Path | None = None
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 1.0
    spool: Path | None = None
    spool_max_gb: float = 10.0
    keep_spool: bool = False
    ae_title: str = "UBC"
    move_to: str | None = None
    page_size: int = 100

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retries < 0 or self.page_size < 1:
            raise ValueError("--timeout must be > 0 and --retries >= 0")

    @property
    def retry(self) -> Retry:
        return Retry(tries=self.retries + 1, backoff_s=self.backoff_s)

    @property
    def spool_max_bytes(self) -> int:
        return int(self.spool_max_gb * 1e9)


def parse_query(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` filters (``--query``): KEY a DICOM keyword (``ModalitiesInStudy``) or
    tag (``00080061``); ValueError naming a malformed one."""
    from pydicom.datadict import tag_for_keyword

    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--query {item!r}: expected KEY=VALUE, e.g. "
                             "ModalitiesInStudy=MR or StudyDate=20260101-20261231")
        if tag_for_keyword(key) is None and not _TAG.match(key):
            raise ValueError(f"--query {key!r} is not a DICOM keyword (e.g. StudyDate, "
                             "ModalitiesInStudy, StudyInstanceUID) or an 8-digit hex tag")
        parsed.append((key, value.strip()))
    return tuple(parsed)


def read_auth(path: str | Path) -> str | tuple[str, str]:
    """The credentials of ``--auth-file``: ``user:password`` (basic auth) or a bearer token
    (one line; its text is never shown)."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UBCInputError(f"--auth-file {path}: cannot read it ({type(exc).__name__})") \
            from exc
    if not text or "\n" in text:
        raise UBCInputError(f"--auth-file {path}: expected one line, a bearer token or "
                            "user:password")
    user, sep, password = text.partition(":")
    return (user, password) if sep and " " not in text else text


def is_pacs_url(text: str) -> bool:
    """True for ``http(s)://...`` and ``dicom://...`` (an ``--input`` that is a PACS)."""
    return text.split("://", 1)[0].lower() in _SCHEMES and "://" in text


def _module(url: str) -> ModuleType:
    scheme = url.split("://", 1)[0].lower()
    if "://" not in url or scheme not in _SCHEMES:
        raise ValueError(f"{url!r}: not a PACS address (http(s)://HOST/dicom-web or "
                         "dicom://AET@HOST:PORT)")
    needs = "dicomweb_client" if _SCHEMES[scheme] == "dicomweb" else "pynetdicom"
    if importlib.util.find_spec(needs) is None:
        raise UBCInputError(f"{url}: needs {needs}: pip install ubc[pacs]")
    return importlib.import_module(f"ubc.net.{_SCHEMES[scheme]}")


def open_pacs(url: str, settings: PacsSettings) -> Pacs:
    """The PACS node at ``url`` (its protocol by the scheme)."""
    pacs: Pacs = _module(url).open_pacs(url, settings)
    return pacs


def open_store(destination: str, settings: PacsSettings) -> SegStore:
    """Where ``--store-seg`` sends SEGs: a DICOMweb URL (STOW-RS), ``dicom://AET@HOST:PORT``
    or ``AET@HOST:PORT`` (C-STORE)."""
    if _NODE.match(destination):
        destination = f"dicom://{destination}"
    store: SegStore = _module(destination).open_store(destination, settings)
    return store


def open_source(url: str, settings: PacsSettings) -> PacsSource:
    """The archive source of ``--input URL``."""
    return PacsSource(open_pacs(url, settings), settings)


class PacsSource:
    """The studies of a PACS matching ``settings.query`` as cases (an
    ``ubc.scoring.discover.ArchiveSource``): one case per study, its id the
    StudyInstanceUID (``case_id="patient"``: PatientID + StudyDate). Finding the studies
    failing is the run's failure (``UBCInputError``: nothing to score); a study whose
    series or metadata cannot be read is an error row naming the step."""

    def __init__(self, pacs: Pacs, settings: PacsSettings) -> None:
        self.pacs, self.settings = pacs, settings
        self.spool = Spool(settings.spool, settings.spool_max_bytes, settings.keep_spool)
        self._studies: dict[str, str] = {}  # case id -> study UID

    @property
    def where(self) -> str:
        return self.pacs.where

    def __str__(self) -> str:
        return self.where

    def discover(self, *, pattern: str | None, limit: int | None,
                 series_select: SeriesSelector | None, case_id: str) -> Discovery:
        if pattern is not None:
            raise ValueError("--pattern selects files of a folder; a PACS is filtered with "
                             "--query KEY=VALUE")
        if case_id not in CASE_ID_MODES:
            raise ValueError(f"case_id must be one of {CASE_ID_MODES}, got {case_id!r}")
        query = dict(self.settings.query)
        uids = with_retries(lambda: list(dict.fromkeys(
            islice(self.pacs.find_studies(query), limit))), self.settings.retry,
            what=self.where, step=FIND)
        if not uids and limit != 0:
            keys = ", ".join(query) or "none"
            raise UBCInputError(f"{self.where}: no study matches the query (filters on: "
                                f"{keys})")
        return Discovery(self._cases(uids, series_select, case_id), [])

    def _cases(self, uids: Sequence[str], selector: SeriesSelector | None,
               mode: str) -> list[Case]:
        cases = []
        for uid in uids:
            study, patient_key = remote_study(self.pacs, self.spool, self.settings.retry,
                                              uid, selector)
            case_id = patient_key if mode == "patient" and patient_key else uid
            if case_id in self._studies and self._studies[case_id] != uid:
                raise UBCInputError(f"{self.where}: two studies share the case id of study "
                                    f"{uid} (--case-id {mode}); use --case-id study")
            self._studies[case_id] = uid
            cases.append(Case(case_id, study_path(self.where, uid), reader=study))
        return cases

    def release(self, case_id: str) -> None:
        uid = self._studies.get(case_id)
        if uid is not None:
            self.spool.release(uid)

    def close(self) -> None:
        self.spool.close()
        self.pacs.close()
