"""A fast reader of the header elements that discovery and assembly need (``ubc.io.dicom``),
for the files scanners and archives hold by the thousand: Part 10, implicit or explicit VR
little endian, ASCII values, no functional groups.

pydicom parses and converts every element of every file: about 1 ms per instance, 150 ms
for a 155-slice series before a voxel is read (``ubc-bench --feed``). This reader walks the
elements in the native core (``csrc/core/dicom_walk.cpp``: each skipped by its length,
sequences of undefined length by their delimiters, up to the pixel data, whose offset it
returns) and converts the few it keeps as pydicom would: 8-16 ms for such a series, 6x less
than pydicom's ``stop_before_pixels`` parse (55-90 ms). Anything it does not expect
(another transfer syntax, a VR other than the standard's, a non-ASCII or multi-valued
binary value, functional groups, odd lengths, a truncated file) makes it answer None, and
the caller reads the file with pydicom, which explains what is wrong.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ubc import _native

__all__ = ["HeaderFields", "ScannedHeader", "scan_header"]

_HEAD_BYTES = 64 * 1024  # a typical single-frame header is 1-10 kB
_MAX_HEADER_BYTES = 64 * 1024 * 1024  # beyond this, pydicom reads it
_IMPLICIT, _EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_TAG, _U16, _U32 = struct.Struct("<HH"), struct.Struct("<H"), struct.Struct("<I")
_CONTROL = re.compile(rb"[\x00-\x1f]")
_TEXT_VRS = {b"LO", b"SH"}  # each value keeps its leading spaces (pydicom's convert_text)
#: tag -> (pydicom keyword, VR) of the elements kept
_WANTED = {
    0x00080008: ("ImageType", b"CS"), 0x00080016: ("SOPClassUID", b"UI"),
    0x00080018: ("SOPInstanceUID", b"UI"), 0x00080020: ("StudyDate", b"DA"),
    0x00080060: ("Modality", b"CS"), 0x0008103E: ("SeriesDescription", b"LO"),
    0x00100020: ("PatientID", b"LO"), 0x00180020: ("ScanningSequence", b"CS"),
    0x00180024: ("SequenceName", b"SH"), 0x00180050: ("SliceThickness", b"DS"),
    0x00180081: ("EchoTime", b"DS"), 0x00180082: ("InversionTime", b"DS"),
    0x00181030: ("ProtocolName", b"LO"), 0x0020000D: ("StudyInstanceUID", b"UI"),
    0x0020000E: ("SeriesInstanceUID", b"UI"), 0x00200011: ("SeriesNumber", b"IS"),
    0x00200032: ("ImagePositionPatient", b"DS"),
    0x00200037: ("ImageOrientationPatient", b"DS"), 0x00280002: ("SamplesPerPixel", b"US"),
    0x00280004: ("PhotometricInterpretation", b"CS"), 0x00280008: ("NumberOfFrames", b"IS"),
    0x00280010: ("Rows", b"US"), 0x00280011: ("Columns", b"US"),
    0x00280030: ("PixelSpacing", b"DS"), 0x00280100: ("BitsAllocated", b"US"),
    0x00280101: ("BitsStored", b"US"), 0x00280103: ("PixelRepresentation", b"US"),
    0x00281052: ("RescaleIntercept", b"DS"), 0x00281053: ("RescaleSlope", b"DS"),
}
_WANTED_TAGS = sorted(_WANTED)


class _Unusual(Exception):
    """The file is left to pydicom."""


class _Short(Exception):
    """The buffer ends before the header does."""


class HeaderFields(dict[str, Any]):
    """The kept elements under their pydicom keywords, converted as pydicom converts them
    (strings, lists of strings for several values, ints for US; UIDs as plain strings):
    enough of a pydicom ``Dataset`` (``get``, ``in``, attribute access, ``file_meta``) for
    ``ubc.io.dicom``."""

    file_meta: SimpleNamespace

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class ScannedHeader:
    """``fields``; ``pixels``: (offset, length) of a top-level PixelData value of defined
    length (None when there is none); ``size`` and ``mtime_ns`` of the file read."""

    fields: HeaderFields
    pixels: tuple[int, int] | None
    size: int
    mtime_ns: int


def scan_header(path: Path) -> ScannedHeader | None:
    """The header of the DICOM file ``path`` read without pydicom, or None when the file is
    not one this reader expects (see the module docstring)."""
    try:
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            buf = file.read(_HEAD_BYTES)
            try:
                return _scan(buf, len(buf) == stat.st_size, stat)
            except (_Short, struct.error):
                if stat.st_size > _MAX_HEADER_BYTES or len(buf) == stat.st_size:
                    return None
                buf += file.read()
                return _scan(buf, True, stat)
    except (_Unusual, _Short, struct.error, OSError, ValueError):
        return None


def _scan(buf: bytes, complete: bool, stat: os.stat_result) -> ScannedHeader:
    if buf[128:132] != b"DICM":
        raise _Unusual
    meta, pos = _file_meta(buf)
    syntax = meta.get(0x00020010, "")
    if syntax not in (_IMPLICIT, _EXPLICIT):
        raise _Unusual
    explicit = syntax == _EXPLICIT
    fields = HeaderFields()
    fields.file_meta = SimpleNamespace(TransferSyntaxUID=_uid(syntax),
                                       MediaStorageSOPClassUID=meta.get(0x00020002, ""))
    status, kept, pixels = _native.dicom_walk(buf, pos, explicit, complete, _WANTED_TAGS)
    if status == "short":
        raise _Short
    if status != "ok":
        raise _Unusual
    for tag, vr, start, length in kept:
        keyword, wanted_vr = _WANTED[tag]
        if explicit and vr != wanted_vr:
            raise _Unusual
        fields[keyword] = _value(buf[start:start + length], wanted_vr)
    return ScannedHeader(fields, pixels, stat.st_size, stat.st_mtime_ns)


def _file_meta(buf: bytes) -> tuple[dict[int, str], int]:
    """The file meta group's UIDs by tag, and where the data set starts (explicit VR LE)."""
    meta: dict[int, str] = {}
    pos = 132
    while True:
        tag, start, length = _meta_element(buf, pos)
        if tag >> 16 != 0x0002:
            return meta, pos
        if length == _UNDEFINED or start + length > len(buf):
            raise _Unusual
        if tag in (0x00020002, 0x00020010):
            meta[tag] = _ascii(buf[start:start + length]).rstrip("\0 ")
        pos = start + length


def _meta_element(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, value offset, value length) of the explicit VR element at ``pos`` (the file
    meta group's encoding; the data set's elements are walked natively)."""
    group, number = _TAG.unpack_from(buf, pos)
    if buf[pos + 4:pos + 6] in _LONG_VRS:
        return group << 16 | number, pos + 12, _U32.unpack_from(buf, pos + 8)[0]
    return group << 16 | number, pos + 8, _U16.unpack_from(buf, pos + 6)[0]


def _ascii(raw: bytes) -> str:
    """``raw`` as text when it is printable ASCII (then every character set pydicom knows
    reads it the same); ``_Unusual`` otherwise."""
    if not raw.isascii() or _CONTROL.search(raw.rstrip(b"\0")):
        raise _Unusual
    return raw.decode("ascii")


def _value(raw: bytes, vr: bytes) -> Any:
    """One element's value as pydicom gives it: an int for US, else a string (a list of
    strings for several values), padding stripped as pydicom strips it."""
    if not raw:
        return None if vr in (b"US", b"DS", b"IS") else ""  # pydicom's empty values
    if vr == b"US":
        if len(raw) != 2:
            raise _Unusual
        return _U16.unpack(raw)[0]
    text = _ascii(raw)
    if vr in _TEXT_VRS:
        items = [item.rstrip("\0 ") for item in text.split("\\")]
    else:
        items = text.strip(" \0" if vr in (b"DS", b"IS") else "").rstrip(" \0").split("\\")
    if vr in (b"DS", b"IS"):
        for item in items:
            float(item)  # ValueError: pydicom says what is wrong
    return items[0] if len(items) == 1 else items


@functools.cache
def _uid(text: str) -> Any:
    """pydicom's UID of a transfer syntax (one of two: its validation, 20 us, done once)."""
    from pydicom.uid import UID

    return UID(text)
