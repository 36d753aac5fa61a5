"""What a file holds, from its first bytes (whatever its name): a NIfTI header (plain or
gzipped), an NRRD header, a DICOM Part 10 file, a zip archive, or none of these."""

from __future__ import annotations

import os
import zipfile
import zlib

__all__ = ["NIFTI", "NRRD", "DICOM", "ZIP", "file_kind"]

NIFTI, NRRD, DICOM, ZIP = "NIfTI", "NRRD", "DICOM", "zip"
_NIFTI_MAGIC = {348: (344, (b"n+1\0", b"ni1\0")), 540: (4, (b"n+2\0", b"ni2\0"))}
_HEAD_BYTES = 64 * 1024  # enough gzip to inflate a NIfTI-2 header's 540 bytes


def _is_nifti(head: bytes) -> bool:
    """A NIfTI-1/2 header: sizeof_hdr 348 or 540 (either byte order) and its magic."""
    for size in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")):
        magic = _NIFTI_MAGIC.get(size)
        if magic is not None:
            offset, values = magic
            return head[offset:offset + 4] in values
    return False


def _inflated(raw: bytes) -> bytes:
    """The first bytes of a gzip stream's content (b"" when it is not one)."""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw, 1024)
    except zlib.error:
        return b""


def file_kind(path: str | os.PathLike[str]) -> str | None:
    """``NIFTI``, ``NRRD``, ``DICOM``, ``ZIP`` by the file's content, None for anything
    else (a text file included). ``OSError`` when it cannot be read."""
    from ubc.io.dicom import is_dicom_file
    from ubc.io.nrrd import NRRD_MAGIC

    with open(path, "rb") as file:
        raw = file.read(_HEAD_BYTES)
    if raw.startswith(NRRD_MAGIC):
        return NRRD
    if _is_nifti(_inflated(raw) if raw[:2] == b"\x1f\x8b" else raw):
        return NIFTI
    if is_dicom_file(path):
        return DICOM
    if zipfile.is_zipfile(path):
        return ZIP
    return None
