"""The fast DICOM header reader (``ubc.io.dicom_scan``) reads what pydicom reads: for every
file it accepts, ``read_header`` gives the header and the located pixels that pydicom's
parse gives; every other file is left to pydicom (same header, same refusals)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from ubc.errors import UBCInputError  # noqa: E402
from ubc.io import dicom  # noqa: E402
from ubc.io.dicom_scan import scan_header  # noqa: E402
from ubc.io.dicom_write import SeriesSpec, write_series  # noqa: E402
from ubc.synth import phantom_affine  # noqa: E402

_PYDICOM_RAISED = object()


def _by_pydicom(path: Path) -> object:
    """``read_header``'s answer computed from pydicom's parse alone (or its error text)."""
    try:
        with open(path, "rb") as file:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
            header = dicom._header_of(ds, path)
            if header is None or not header.image:
                return header
            return dataclasses.replace(header, instance=dicom._instance_at(ds, path, file))
    except UBCInputError as exc:
        return str(exc)
    except Exception:
        return _PYDICOM_RAISED


def _by_read_header(path: Path) -> object:
    try:
        return dicom.read_header(path)
    except UBCInputError as exc:
        return str(exc)


def _same(path: Path) -> bool:
    fast, slow = _by_read_header(path), _by_pydicom(path)
    if slow is _PYDICOM_RAISED:
        return isinstance(fast, str)  # read_header turns it into a UBCInputError
    if isinstance(fast, dicom.InstanceHeader) and isinstance(slow, dicom.InstanceHeader):
        return fast == slow and fast.instance == slow.instance
    return fast == slow


def _spec(name: str, **kwargs: object) -> SeriesSpec:
    return SeriesSpec(f"1.2.3.{len(name)}", f"1.2.3.{len(name)}.1", f"1.2.3.{len(name)}.2",
                      **kwargs)  # type: ignore[arg-type]


def _written(tmp_path: Path, name: str, **kwargs: object) -> list[Path]:
    data = np.arange(24 * 20 * 9, dtype=np.int16).reshape(24, 20, 9)
    return write_series(data, phantom_affine(data.shape), tmp_path / name, _spec(name, **kwargs))


def _rewrite(path: Path, implicit: bool = False, **values: object) -> Path:
    """``path`` with ``values`` set; its sequences and their items of undefined length (ended
    by delimiters, as many scanners write them)."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = True
            for item in element.value:
                item.is_undefined_length_sequence_item = True
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_written_series_read_as_pydicom_reads_them(tmp_path: Path) -> None:
    """Single-frame series in both little-endian encodings, with undefined-length
    sequences nested in items, private elements, several values, empty and padded values,
    rescale, and an Enhanced MR instance (left to pydicom): one header, one pixel offset."""
    plain = _written(tmp_path, "plain")
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", "1.2"
    inner = pydicom.Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "DCM", "x"
    item.PurposeOfReferenceCodeSequence = [inner]
    varied = [
        _rewrite(plain[0], implicit=True),
        _rewrite(plain[1], ReferencedImageSequence=[item, item], ImageType=["DERIVED", "X "],
                 SeriesDescription="  AX\\FLAIR ", EchoTime="", InversionTime=" 2500 "),
        _rewrite(plain[2], implicit=True, ReferencedImageSequence=[item],
                 RescaleSlope="0.5", RescaleIntercept="-10"),
    ]
    private = pydicom.dcmread(plain[3])
    block = private.private_block(0x0029, "UBC TEST", create=True)
    block.add_new(0x10, "OB", b"\x00" * 3000)
    block.add_new(0x11, "SQ", [item])
    private.save_as(plain[3], enforce_file_format=True)
    multiframe = write_series(np.zeros((16, 16, 8), np.int16), phantom_affine((16, 16, 8)),
                              tmp_path / "mf", _spec("mf"), multiframe=True)
    files = [*plain, *varied, *multiframe]
    assert all(_same(p) for p in files), [p.name for p in files if not _same(p)]
    assert all(scan_header(p) is not None for p in [*plain, *varied])
    assert b"\xfe\xff\xdd\xe0" in varied[2].read_bytes()  # sequence delimiters were skipped
    assert scan_header(multiframe[0]) is None  # functional groups: pydicom's
    header = dicom.read_header(varied[1])
    assert header is not None and header.image_type == "DERIVED\\X" \
        and header.description == "  AX\\FLAIR" and header.echo_time_ms is None \
        and header.inversion_time_ms == 2500.0


def test_unusual_and_damaged_files_are_left_to_pydicom(tmp_path: Path) -> None:
    """Non-ASCII text, a deflated file, a VR the standard does not give, a sequence of
    undefined length as UN, and truncations at every part of the header: the answer
    (header or refusal) is pydicom's."""
    files = _written(tmp_path, "odd")
    latin = _rewrite(files[0], SpecificCharacterSet="ISO_IR 100", SeriesDescription="Flär")
    assert scan_header(latin) is None and _same(latin)
    ds = pydicom.dcmread(files[1])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(files[1], enforce_file_format=True)
    assert scan_header(files[1]) is None and _same(files[1])
    raw = files[2].read_bytes()
    rows = raw.index(b"\x28\x00\x10\x00US")
    wrong_vr = files[3]
    wrong_vr.write_bytes(raw[:rows + 4] + b"SS" + raw[rows + 6:])
    assert scan_header(wrong_vr) is None and _same(wrong_vr)
    item = pydicom.Dataset()
    item.ReferencedSOPInstanceUID = "1.2"
    sequenced = pydicom.dcmread(files[4])
    sequenced.ReferencedImageSequence = [item]
    sequenced["ReferencedImageSequence"].is_undefined_length = True
    sequenced.save_as(files[4], enforce_file_format=True)
    sequenced = files[4]
    data = sequenced.read_bytes()
    assert data[data.index(b"\x08\x00\x40\x11SQ") + 8:][:4] == b"\xff" * 4
    at = data.index(b"\x08\x00\x40\x11SQ")  # undefined length: as UN, implicit inside
    sequenced.write_bytes(data[:at + 4] + b"UN" + data[at + 6:])
    assert scan_header(sequenced) is None and _same(sequenced)
    pixels = raw.index(b"\xe0\x7f\x10\x00")
    for cut in (100, 140, 200, rows + 5, pixels - 3, pixels + 6, pixels + 20):
        truncated = tmp_path / f"cut{cut}.dcm"
        truncated.write_bytes(raw[:cut])
        assert _same(truncated), cut


def test_pydicom_test_files_read_as_pydicom_reads_them() -> None:
    """Every file of pydicom's own test data (real-world headers of many makers, and damaged
    ones) gives ``read_header`` pydicom's answer."""
    from pydicom.data.data_manager import DATA_ROOT

    files = [p for p in sorted((Path(DATA_ROOT) / "test_files").rglob("*"))
             if dicom.is_dicom_file(p)]
    if len(files) < 50:
        pytest.skip("pydicom's bundled test files are not installed")
    different = [p.name for p in files if not _same(p)]
    assert not different
    assert sum(scan_header(p) is not None for p in files) >= 20  # the fast path is exercised


def _explicit(group: int, element: int, vr: bytes, value: bytes, *,
              undefined: bool = False) -> bytes:
    """One explicit VR little endian element (a long-form VR when ``undefined``)."""
    tag = group.to_bytes(2, "little") + element.to_bytes(2, "little")
    if vr in (b"SQ", b"OB", b"UN") or undefined:
        length = b"\xff" * 4 if undefined else len(value).to_bytes(4, "little")
        return tag + vr + b"\0\0" + length + value
    return tag + vr + len(value).to_bytes(2, "little") + value


def _item(value: bytes, *, undefined: bool) -> bytes:
    if undefined:
        return b"\xfe\xff\x00\xe0" + b"\xff" * 4 + value + b"\xfe\xff\x0d\xe0" + b"\0" * 4
    return b"\xfe\xff\x00\xe0" + len(value).to_bytes(4, "little") + value


def _nested(depth: int) -> bytes:
    """A sequence of undefined length holding items of undefined length ``depth`` deep."""
    inner = _explicit(0x0008, 0x1155, b"UI", b"1.2\0")
    for _ in range(depth):
        inner = _explicit(0x0008, 0x1140, b"SQ", _item(inner, undefined=True)
                          + b"\xfe\xff\xdd\xe0" + b"\0" * 4, undefined=True)
    return inner


def test_the_native_walk_skips_nested_sequences_and_keeps_the_wanted_elements() -> None:
    """The core's element walk: wanted top-level elements before and after nested sequences
    of defined and undefined length are kept at their offsets, elements inside sequences
    are not; the pixel data ends the walk; a cut buffer is short; nesting past the core's
    limit and a top-level item are left to pydicom."""
    from ubc import _native

    rows = _explicit(0x0028, 0x0010, b"US", b"\x40\x00")
    defined = _explicit(0x0008, 0x1115, b"SQ", _item(_explicit(0x0028, 0x0011, b"US",
                                                               b"\x10\x00"), undefined=False))
    modality = _explicit(0x0008, 0x0060, b"CS", b"MR")
    pixels = _explicit(0x7FE0, 0x0010, b"OB", b"\1\2\3\4")
    data = b"\0" * 8 + modality + _nested(3) + defined + rows + pixels
    wanted = sorted([0x00080060, 0x00280010, 0x00280011, 0x00081155])
    status, kept, found = _native.dicom_walk(data, 8, True, False, wanted)
    assert status == "ok" and found == (len(data) - 4, 4)
    assert [(tag, vr) for tag, vr, _, _ in kept] == [(0x00080060, b"CS"), (0x00280010, b"US")]
    for tag, _, start, length in kept:
        assert data[start:start + length] == (b"MR" if tag == 0x00080060 else b"\x40\x00")
    no_pixels = data[:-len(pixels)]
    assert _native.dicom_walk(no_pixels, 8, True, True, wanted)[0] == "ok"
    assert _native.dicom_walk(no_pixels, 8, True, False, wanted)[0] == "short"
    for cut in range(9, len(data) - len(pixels), 7):
        assert _native.dicom_walk(data[:cut], 8, True, False, wanted)[0] == "short", cut
    assert _native.dicom_walk(b"\0" * 8 + _nested(32), 8, True, True, wanted)[0] == "ok"
    assert _native.dicom_walk(b"\0" * 8 + _nested(33), 8, True, True, wanted)[0] == "unusual"
    top_item = b"\0" * 8 + _item(modality, undefined=False)
    assert _native.dicom_walk(top_item, 8, True, True, wanted)[0] == "unusual"
