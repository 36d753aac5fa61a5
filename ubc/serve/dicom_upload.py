"""A DICOM study as an upload (``POST /v1/studies``, issue 30): the body, a STOW-RS request
(``multipart/related; type="application/dicom"``, one Part 10 instance per part, as
``dicomweb-client``'s ``store_instances`` sends it) or a zip of a series or study, is
written into the request's own folder; its one study is found and its series chosen as for
files (``ubc.io.dicom_select.scan_studies``), and what decoding the chosen series will take
is read from its instances' headers before any pixel is decoded.

The multipart body is split here, in a few lines over ``bytes.find`` (RFC 2046 section
5.1.1), instead of with a library: the parts are views of the buffered body written
straight to their files (no copy of an upload of hundreds of MB), the stdlib ``email``
parser would decode the whole binary body into text lines, and ``requests_toolbelt``'s
decoder (a new dependency) copies every part. Part headers are parsed by the stdlib.

The answer a STOW-RS client parses is DICOM JSON (``application/dicom+json``, PS3.18 F.2):
``dicomweb-client`` turns any JSON answer into a ``pydicom.Dataset``, so the row travels in a
private block of that dataset (``answer_of`` reads it back): ``ROW_TAG`` (UT) holds the
answer as JSON text and, when asked, ``SEG_TAG`` (OB, ``InlineBinary``) the SEG's Part 10
bytes, which a DICOM JSON reader decodes without any help.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import zipfile
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ubc.errors import UBCInputError
from ubc.io.dicom_select import DicomStudy, SeriesInfo, SeriesSelector, scan_studies
from ubc.io.readers import DicomSeries, Identity, SourceColumns
from ubc.io.volume import Volume
from ubc.serve.upload import WORKING_BYTES_PER_VOXEL, TooLarge

if TYPE_CHECKING:
    import pydicom

    from ubc.io.dicom import InstanceHeader
    from ubc.scoring.prediction import Prediction
    from ubc.scoring.stages import RunContext

__all__ = ["MULTIPART", "DICOM", "ZIP", "MAX_INSTANCES", "PRIVATE_CREATOR", "ROW_TAG",
           "SEG_TAG", "Unsupported", "body_kind", "split_parts", "write_upload", "find_study",
           "series_cost", "StudyReader", "dicom_json", "answer_of", "remove_folder",
           "scrub", "receive_study", "seg_bytes"]

MULTIPART, DICOM, ZIP = "multipart/related", "application/dicom", "application/zip"
_ZIPS = (ZIP, "application/x-zip-compressed")
MAX_INSTANCES = 20_000  # parts of a body, files of a zip
_MAX_PART_HEADER = 8192
#: the answer's private block (PS3.5 section 7.8): its creator, the row, the SEG
PRIVATE_CREATOR = "UBC 1"
ROW_TAG, SEG_TAG = 0x00111001, 0x00111002
_CREATOR_TAG = 0x00110010
_COST_TAGS = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"]
_MB = 1024 * 1024


class Unsupported(Exception):
    """A body or part of a media type this service does not take (HTTP 415)."""


def body_kind(content_type: str | None) -> tuple[str, str | None]:
    """``("multipart", boundary)`` or ``("zip", None)`` from the request's Content-Type;
    ``Unsupported`` for any other type, ``UBCInputError`` for a multipart without boundary."""
    wanted = f'send {MULTIPART}; type="{DICOM}" (STOW-RS) or {ZIP}'
    if not content_type:
        raise Unsupported(f"no Content-Type: {wanted}")
    header = Message()
    header["content-type"] = content_type
    media = header.get_content_type()
    if media in _ZIPS:
        return "zip", None
    part_type = str(header.get_param("type") or "").lower()
    if media != MULTIPART or part_type != DICOM:
        shown = f'{media}; type="{part_type}"' if media == MULTIPART else media
        raise Unsupported(f"{shown} is not taken here: {wanted}")
    boundary = header.get_boundary()
    if not boundary:
        raise UBCInputError(f"{MULTIPART} without its boundary parameter")
    return "multipart", boundary


def split_parts(body: bytearray | bytes, boundary: str) -> list[memoryview]:
    """The parts of a multipart body, headers included, as views of ``body`` (RFC 2046
    section 5.1.1: what comes before the first delimiter and after the closing one is
    ignored; the first delimiter may open the body without the CRLF before it)."""
    delimiter = b"\r\n--" + boundary.encode("ascii", "replace")
    view = memoryview(body)
    if body.startswith(delimiter[2:]):
        position = len(delimiter) - 2
    else:
        found = body.find(delimiter)
        if found < 0:
            raise UBCInputError(f"no part: the boundary {boundary!r} is not in the body")
        position = found + len(delimiter)
    parts: list[memoryview] = []
    while not body.startswith(b"--", position):  # the closing delimiter ends the parts
        start = body.find(b"\r\n", position)  # after the delimiter's line
        end = body.find(delimiter, start) if start >= 0 else -1
        if end < 0:
            raise UBCInputError(f"the body ends inside part {len(parts) + 1}: no closing "
                                f"boundary {boundary!r}")
        parts.append(view[start + 2:end])
        if len(parts) > MAX_INSTANCES:
            raise UBCInputError(f"more than {MAX_INSTANCES} parts in one body")
        position = end + len(delimiter)
    return parts


def _instance_of(part: memoryview, number: int) -> memoryview:
    """The content of part ``number`` (from 1): what follows its header lines, which
    declare ``application/dicom`` when they declare a type."""
    head = bytes(part[:_MAX_PART_HEADER])
    if head.startswith(b"\r\n"):  # no header lines
        end, start = 0, 2
    else:
        found = head.find(b"\r\n\r\n")
        if found < 0:
            raise UBCInputError(f"part {number}: its header lines do not end within "
                                f"{_MAX_PART_HEADER} bytes")
        end, start = found + 2, found + 4
    headers = BytesHeaderParser().parsebytes(head[:end])
    if headers.get("content-type") is not None and headers.get_content_type() != DICOM:
        raise Unsupported(f"part {number} is {headers.get_content_type()}; the parts here "
                          f"are {DICOM} instances (Part 10 files)")
    content = part[start:]
    if bytes(content[128:132]) != b"DICM":
        raise UBCInputError(f"part {number} ({len(content)} bytes) is not a DICOM Part 10 "
                            "instance: no 'DICM' at byte 128")
    return content


def _extract(archive: Path, folder: Path, limit: int) -> None:
    """Extract the zip ``archive`` into ``folder``: its entries counted and their declared
    sizes summed (``zipfile`` inflates no more than an entry declares) before any is
    extracted; member names are made safe by ``zipfile`` (no absolute paths, no ``..``)."""
    try:
        with zipfile.ZipFile(archive) as opened:
            members = [m for m in opened.infolist() if not m.is_dir()]
            total = sum(m.file_size for m in members)
            if len(members) > MAX_INSTANCES:
                raise UBCInputError(f"the zip holds {len(members)} files; the limit is "
                                    f"{MAX_INSTANCES}")
            if total > limit:
                raise TooLarge(f"the zip holds {total} bytes uncompressed; the limit is "
                               f"{limit} bytes")
            for member in members:
                opened.extract(member, folder)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError,
            OSError) as exc:
        raise UBCInputError(f"the body is not a zip this service can extract "
                            f"({type(exc).__name__}: {exc})") from exc


def write_upload(body: bytearray, kind: str, boundary: str | None, folder: Path,
                 limit: int) -> list[Path] | None:
    """Write the body's instances into ``folder`` (``part-00001.dcm`` ... for a multipart
    body, the zip's own names under ``zip/``); returns the instance files of a multipart
    body, None for a zip (its DICOM files are found by content, as in a folder). ``limit``:
    bytes a zip may hold uncompressed (the upload limit: what its instances would weigh as
    parts)."""
    if kind == "zip":
        archive = folder / "upload.zip"
        archive.write_bytes(body)
        try:
            _extract(archive, folder / "zip", limit)
        finally:
            archive.unlink()
        return None
    assert boundary is not None
    contents = [_instance_of(part, n) for n, part in enumerate(split_parts(body, boundary), 1)]
    files = []
    for number, content in enumerate(contents, 1):
        path = folder / f"part-{number:05d}.dcm"
        path.write_bytes(content)
        files.append(path)
    return files


def find_study(folder: Path, files: list[Path] | None,
               selector: SeriesSelector | None) -> DicomStudy:
    """The one study of the upload, its series chosen; ``UBCInputError`` for a file whose
    header cannot be read, no study, more than one (naming their UIDs) or no series to
    score (why)."""
    studies, unreadable = scan_studies(folder, selector, files=files)
    if unreadable:
        more = f" (and {len(unreadable) - 3} more)" if len(unreadable) > 3 else ""
        raise UBCInputError("; ".join(why for _, why in unreadable[:3]) + more)
    if not studies:
        raise UBCInputError("the body holds no DICOM instance")
    if len(studies) > 1:
        uids = ", ".join(s.study_uid for s in studies[:5])
        raise UBCInputError(f"the body holds {len(studies)} studies ({uids}"
                            f"{', ...' if len(studies) > 5 else ''}); send one study per "
                            "request")
    study = studies[0]
    if study.chosen is None:
        raise UBCInputError(f"study {study.study_uid}: {study.error}")
    return study


def series_cost(series: SeriesInfo, limit: int) -> int:
    """Bytes of memory that decoding and scoring ``series`` will hold (its values as stored
    plus ``WORKING_BYTES_PER_VOXEL`` a voxel), from its instances' headers alone;
    ``TooLarge`` over ``limit``."""
    import pydicom

    voxels, stored = 0, 0
    for path in series.files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_COST_TAGS)
            count = _int(ds, "Rows", 0) * _int(ds, "Columns", 0) \
                * _int(ds, "NumberOfFrames", 1) * _int(ds, "SamplesPerPixel", 1)
            depth = math.ceil(_int(ds, "BitsAllocated", 16) / 8)
        except Exception as exc:  # values pydicom cannot parse
            raise UBCInputError(f"{path}: unreadable image size ({type(exc).__name__}: "
                                f"{str(exc)[:200]})") from exc
        voxels, stored = voxels + count, stored + count * depth
    cost = stored + voxels * WORKING_BYTES_PER_VOXEL
    if cost > limit:
        raise TooLarge(f"series {series.summary()}: its headers declare {voxels:,} voxels "
                       f"({stored / _MB:,.0f} MB as stored), {cost / _MB:,.0f} MB to decode "
                       f"and score; this service takes at most {limit / _MB:,.0f} MB per "
                       "volume")
    return cost


def _int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword)
    return default if value in (None, "") else max(int(value), 0)


def receive_study(body: bytearray, kind: str, boundary: str | None, folder: Path,
                  selector: SeriesSelector | None, upload_limit: int,
                  volume_limit: int) -> tuple[DicomStudy, int]:
    """The upload's study (``write_upload`` into ``folder``, then ``find_study``) and what
    decoding its chosen series will take (``series_cost``)."""
    files = write_upload(body, kind, boundary, folder, upload_limit)
    study = find_study(folder, files, selector)
    assert study.chosen is not None
    return study, series_cost(study.chosen, volume_limit)


class StudyReader:
    """The chosen series of an uploaded study (``DicomSeries``) that keeps the source frames
    of the volume it loads: what the SEG references."""

    def __init__(self, study: DicomStudy) -> None:
        self._series = DicomSeries(study)
        self.source_frames: tuple[tuple[Path, int], ...] | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        return self._series.flags

    def identity(self) -> Identity:
        return self._series.identity()

    def columns(self) -> SourceColumns:
        return self._series.columns()

    def load(self) -> Volume:
        volume = self._series.load()
        self.source_frames = volume.source_frames
        return volume

    @property
    def headers(self) -> tuple[InstanceHeader, ...]:
        """The loaded series' instance headers, as discovery read them."""
        return self._series.headers


def seg_bytes(prediction: Prediction, reader: StudyReader, folder: Path,
              context: RunContext) -> bytes:
    """The DICOM SEG of ``prediction``'s mask (asked for), referencing the series that
    ``reader`` loaded, as Part 10 bytes (written in ``folder``, then read)."""
    from ubc.io.dicom_seg import write_seg

    if prediction.mask is None or reader.source_frames is None:
        raise RuntimeError("a SEG needs the mask and the loaded series' frames")
    path = write_seg(prediction.mask, reader.source_frames, folder / "seg.dcm",
                     model=context.model, version=context.bundle_sha256[:12],
                     headers=reader.headers)
    return path.read_bytes()


def dicom_json(answer: dict[str, Any], seg: bytes | None) -> dict[str, Any]:
    """The DICOM JSON dataset of an answer (see the module docstring)."""
    dataset: dict[str, Any] = {
        f"{_CREATOR_TAG:08X}": {"vr": "LO", "Value": [PRIVATE_CREATOR]},
        f"{ROW_TAG:08X}": {"vr": "UT", "Value": [json.dumps(answer, separators=(",", ":"))]}}
    if seg is not None:
        dataset[f"{SEG_TAG:08X}"] = {"vr": "OB",
                                     "InlineBinary": base64.b64encode(seg).decode("ascii")}
    return dataset


def answer_of(dataset: pydicom.Dataset) -> tuple[dict[str, Any], bytes | None]:
    """The answer and the SEG bytes (None when not asked for) of the dataset that a DICOMweb
    client made of the DICOM JSON answer (``DICOMwebClient.store_instances`` returns it)."""
    if dataset.get(_CREATOR_TAG) is None or dataset[_CREATOR_TAG].value != PRIVATE_CREATOR:
        raise ValueError(f"not an answer of ubc-serve: no private block {PRIVATE_CREATOR!r}")
    seg = dataset.get(SEG_TAG)
    return json.loads(dataset[ROW_TAG].value), None if seg is None else bytes(seg.value)


def remove_folder(folder: Path) -> None:
    """Remove a request's folder and everything in it."""
    shutil.rmtree(folder, ignore_errors=True)


def scrub(message: str, folder: Path) -> str:
    """``message`` naming the upload (``<upload>/part-00003.dcm``), not the server's folder."""
    return message.replace(os.fspath(folder), "<upload>")
