"""A PACS over DICOMweb (``dicomweb-client`` on ``requests``): QIDO-RS finds studies (in
pages of ``limit``/``offset``) and series, WADO-RS ``/metadata`` gives a series' headers
without pixel data, WADO-RS streams the chosen series' instances into the spool, STOW-RS
stores a SEG back.

TLS is verified (``--ca-bundle`` names the CAs to trust); ``--auth-file`` holds a bearer
token or ``user:password``. dicomweb-client's own retries are off: ``ubc.net.remote``
retries every call with backoff, and every request has ``--timeout``. The bytes of one
answer are capped while they stream (the spool's cap): a server cannot fill memory with
one endless part.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ubc.errors import UBCInputError
from ubc.net.remote import RETRIEVE, STORE, SpoolFolder, send_seg

if TYPE_CHECKING:
    import requests
    from dicomweb_client import DICOMwebClient
    from pydicom.dataset import Dataset

    from ubc.net.sources import PacsSettings

__all__ = ["DicomWebPacs", "StowStore", "open_pacs", "open_store", "public_url",
           "uids_of", "datasets_of", "instances_of"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"


def public_url(url: str) -> str:
    """``url`` without user:password and query (what rows and messages may say)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _value(item: Any, tag: str) -> str | None:
    """The first value of ``tag`` in one DICOM JSON object; ValueError when the object is
    not DICOM JSON."""
    if not isinstance(item, dict):
        raise ValueError(f"a QIDO answer item is {type(item).__name__}, not a DICOM JSON "
                         "object")
    element = item.get(tag)
    if element is None:
        return None
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values:
        return None
    return str(values[0])


def uids_of(answer: Any, tag: str) -> list[str]:
    """The UIDs ``tag`` of a QIDO answer (a list of DICOM JSON objects); ValueError for an
    answer that is not one or a UID that is not a UID."""
    if not isinstance(answer, list):
        raise ValueError(f"the QIDO answer is {type(answer).__name__}, not a list")
    uids = []
    for item in answer:
        uid = _value(item, tag)
        if uid is None or len(uid) > 64 or not _UID.match(uid):
            raise ValueError(f"a QIDO answer item has no valid UID {tag}")
        uids.append(uid)
    return uids


def _no_bulk(*_: Any) -> None:
    """Bulk data (pixels) is not fetched for metadata."""
    return None


def datasets_of(answer: Any) -> list[Dataset]:
    """The instance headers of a WADO-RS /metadata answer (DICOM JSON); ValueError when it
    is not a list of DICOM JSON objects."""
    from pydicom.dataset import Dataset

    if not isinstance(answer, list):
        raise ValueError(f"the metadata answer is {type(answer).__name__}, not a list")
    datasets = []
    for item in answer:
        if not isinstance(item, dict):
            raise ValueError("a metadata item is not a DICOM JSON object")
        try:
            datasets.append(Dataset.from_json(item, bulk_data_uri_handler=_no_bulk))
        except (KeyError, TypeError, AttributeError) as exc:  # pydicom's words for bad JSON
            raise ValueError(f"a metadata item is not valid DICOM JSON "
                             f"({type(exc).__name__}: {str(exc)[:80]})") from exc
    return datasets


def instances_of(answer: Iterator[Dataset]) -> Iterator[bytes]:
    """The Part-10 bytes of each instance of a WADO-RS answer (dicomweb-client decodes the
    multipart body and reads each part lazily); ValueError when the body is not
    multipart/related DICOM. Transport faults (``requests.RequestException``) and refusals
    (``UBCInputError``: the answer over the spool's cap) pass as they are."""
    import pydicom
    import requests
    from pydicom.filebase import DicomBytesIO

    try:
        for ds in answer:
            buffer = DicomBytesIO()
            pydicom.dcmwrite(buffer, ds)
            yield buffer.getvalue()
    except (requests.RequestException, UBCInputError):
        raise
    except Exception as exc:  # the part decoder's ValueError; pydicom raises many types,
        # OSError among them (a header it read but cannot write back)
        raise ValueError(f"the WADO-RS answer is not a multipart/related body of DICOM "
                         f"instances ({type(exc).__name__}: {str(exc)[:120]})") from exc


def _session(settings: PacsSettings) -> requests.Session:
    import requests

    session = requests.Session()
    session.verify = str(settings.ca_bundle) if settings.ca_bundle else True
    if isinstance(settings.auth, tuple):
        session.auth = settings.auth
    elif settings.auth:
        session.headers["Authorization"] = f"Bearer {settings.auth}"
    return session


def _client(url: str, settings: PacsSettings) -> DICOMwebClient:
    from dicomweb_client import DICOMwebClient

    client = DICOMwebClient(url, session=_session(settings), timeout=settings.timeout_s)
    client.set_http_retry_params(retry=False)  # ours retry (ubc.net.remote.with_retries)
    return client


class _Capped:
    """A response hook capping the bytes one streamed answer may bring (per thread)."""

    def __init__(self) -> None:
        self.local = threading.local()

    def __call__(self, response: requests.Response, *_: Any, **__: Any) -> requests.Response:
        cap = getattr(self.local, "cap", None)
        if cap is None:
            return response
        max_bytes, study_uid = cap
        stream = response.iter_content

        def capped(chunk_size: int | None = 1, decode_unicode: bool = False) -> Iterator[Any]:
            total = 0
            for chunk in stream(chunk_size, decode_unicode=decode_unicode):  # type: ignore[call-overload]
                total += len(chunk)
                if total > max_bytes:
                    raise UBCInputError(
                        f"study {study_uid}: {RETRIEVE}: the series is larger than the "
                        f"spool's cap of {max_bytes / 1e9:g} GB (--spool-max-gb)")
                yield chunk

        response.iter_content = capped  # type: ignore[method-assign]
        return response


class DicomWebPacs:
    """A DICOMweb service root (``ubc.net.remote.Pacs``); one client per thread (the
    loader threads retrieve in parallel)."""

    def __init__(self, url: str, settings: PacsSettings) -> None:
        self.url, self.settings = url.rstrip("/"), settings
        self.where = public_url(url)
        self._local = threading.local()
        self._cap = _Capped()

    @property
    def client(self) -> DICOMwebClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = _client(self.url, self.settings)
            client._session.hooks["response"].append(self._cap)
        return client

    def find_studies(self, query: dict[str, str]) -> Iterator[str]:
        page, offset = self.settings.page_size, 0
        while True:
            answer = self.client.search_for_studies(
                search_filters=query, limit=page, offset=offset, fields=["StudyInstanceUID"])
            yield from uids_of(answer, STUDY_UID)
            if len(answer) < page:
                return
            offset += len(answer)

    def find_series(self, study_uid: str) -> list[tuple[str, str]]:
        answer = self.client.search_for_series(study_uid, fields=["Modality"])
        uids = uids_of(answer, SERIES_UID)
        return [(uid, _value(item, MODALITY) or "") for uid, item in zip(uids, answer,
                                                                        strict=True)]

    def series_metadata(self, study_uid: str, series_uid: str) -> list[Dataset]:
        return datasets_of(self.client.retrieve_series_metadata(study_uid, series_uid))

    def retrieve(self, study_uid: str, series_uid: str, into: SpoolFolder) -> list[Path]:
        self._cap.local.cap = (into.max_bytes, study_uid)
        try:
            answer = self.client.iter_series(study_uid, series_uid,
                                             media_types=(("application/dicom", "*"),))
            return [into.add(raw) for raw in instances_of(answer)]
        finally:
            self._cap.local.cap = None

    def close(self) -> None:
        client = getattr(self._local, "client", None)
        if client is not None:
            client._session.close()


@dataclass
class StowStore:
    """``--store-seg`` over STOW-RS (``ubc.scoring.outputs.SegStore``); picklable (the
    client is made where it is used)."""

    url: str
    settings: PacsSettings
    _client: Any = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "settings": self.settings, "_client": None}

    @property
    def where(self) -> str:
        return public_url(self.url)

    def send(self, path: Path) -> str:
        """STOW-RS ``path``; ``<SOPInstanceUID>@<url>``. ``UBCInputError`` naming the SEG
        and the step when refused or unreachable after the retries."""
        return send_seg(path, self._stow, self.where, self.settings.retry)

    def _stow(self, ds: Dataset, what: str) -> None:
        if self._client is None:
            self._client = _client(self.url.rstrip("/"), self.settings)
        answer = self._client.store_instances([ds])
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise UBCInputError(f"{what}: {STORE}: refused by {self.where} (failure "
                                f"reason {reason})")


def open_pacs(url: str, settings: PacsSettings) -> DicomWebPacs:
    """The DICOMweb service at ``url`` (``http(s)://HOST/dicom-web``)."""
    if not urlsplit(url).hostname:
        raise ValueError(f"{public_url(url)}: no host in the DICOMweb URL")
    return DicomWebPacs(url, settings)


def open_store(url: str, settings: PacsSettings) -> StowStore:
    """STOW-RS to the DICOMweb service at ``url``."""
    if not urlsplit(url).hostname:
        raise ValueError(f"{public_url(url)}: no host in the DICOMweb URL")
    return StowStore(url, settings)
