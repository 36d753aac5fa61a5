"""DICOM in: recognise files by content, group instances by study and series reading headers
only, and assemble the chosen series into the same canonical RAS ``Volume`` as the NIfTI
path (``ubc.io.nifti``). Series selection rules live in ``ubc.io.dicom_select``.

Recognition: a file is DICOM when bytes 128..131 are ``DICM`` (Part 10 files; any name, any
nesting; DICOMDIR index files and non-image objects are skipped). Files without the Part 10
preamble are not read.

Assembly (``load_series``), refused with ``UBCInputError`` and never guessed:
- a modality other than MR, colour or MONOCHROME1 images, frames of mixed size, pixel
  spacing or orientation, a missing ImageOrientationPatient/ImagePositionPatient;
- two frames at the same position along the slice normal (``DUPLICATE_TOL_MM``), a gap of
  missing slices or otherwise non-uniform steps (beyond ``SPACING_RTOL`` of the median step),
  a stack whose positions drift sideways (gantry tilt or shear beyond ``TILT_TOL_DEG``);
- compressed pixel data with no decoder installed (the message names the missing extra).
Frames are sorted by their position along the slice normal (cross product of the two
ImageOrientationPatient vectors), whatever the file names or InstanceNumbers say. Rescale
slope/intercept are applied per frame (float32 when any is not 1/0, else the stored integer
dtype). Multi-frame (Enhanced MR) instances are read from their functional groups. Voxel
``(i, j, k)`` = column ``i``, row ``j`` of the ``k``-th frame along the normal; DICOM's LPS
patient coordinates become RAS (x and y negated); then the volume is reoriented to
canonical RAS exactly as a NIfTI file is.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ubc.errors import UBCInputError
from ubc.io.dicom_scan import HeaderFields, scan_header
from ubc.io.nifti import MAX_VOXELS  # one voxel cap for every format
from ubc.io.volume import Volume, canonical_volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    _Header = Dataset | HeaderFields  # what the header readers below take

__all__ = ["DUPLICATE_TOL_MM", "SPACING_RTOL", "TILT_TOL_DEG", "MAX_VOXELS", "InstanceHeader",
           "is_dicom_file", "find_dicom_files", "read_header", "load_series"]

DUPLICATE_TOL_MM = 0.01  # two frames closer than this along the normal share a position
SPACING_RTOL = 0.01  # a step may differ from the median step by 1 % (and 0.01 mm)
TILT_TOL_DEG = 0.1  # sideways drift of the stack allowed before it counts as tilted/sheared
ORIENTATION_TOL = 1e-3  # direction cosines of two frames "equal" within this
_SKIP_SOP_CLASSES = {"1.2.840.10008.1.3.10"}  # Media Storage Directory (DICOMDIR)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class InstanceHeader:
    """What series grouping and selection need from one instance (header only). ``normal``
    is the slice normal in LPS (None when the instance has no orientation)."""

    path: Path
    study_uid: str
    series_uid: str
    modality: str
    description: str
    protocol: str
    sequence_name: str
    scanning_sequence: str
    inversion_time_ms: float | None
    echo_time_ms: float | None
    image_type: str
    series_number: int | None
    frames: int
    normal: tuple[float, float, float] | None
    patient_id: str
    study_date: str
    sop_uid: str = ""
    sop_class: str = ""
    image: bool = True  # False for an object without pixel rows (a report, a plan, ...)
    contents: str = ""  # what the object is, for a study without images: "SR", "RTPLAN"
    #: what ``load_series`` needs of the instance, read with the header, so that it is not
    #: parsed again (None when its pixels need pydicom: compressed, unusual layouts)
    instance: _Instance | None = dataclasses.field(default=None, compare=False, repr=False)


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True when the file starts with a DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def find_dicom_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every DICOM file under ``root`` (sorted; hidden files and folders skipped)."""
    found = []
    for folder, dirs, names in os.walk(root):  # followlinks=False: no symlink loops
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            if not name.startswith(".") and is_dicom_file(path):
                found.append(path)
    return found


def _text(ds: _Header, keyword: str) -> str:
    """The value as text, interned: discovery keeps the headers of every instance of every
    study it finds until that study is scored, and most values repeat across a series."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return sys.intern("\\".join(str(v) for v in value))
    return sys.intern(str(value).strip())


def _number(ds: _Header, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _shared_item(ds: _Header, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` in the shared functional groups, if any."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared or sequence not in shared[0]:
        return None
    items = shared[0][sequence].value
    return items[0] if items else None


def _floats(values: Any) -> list[float] | None:
    """``values`` as floats; None when they are not a sequence of numbers (a malformed
    ImageOrientationPatient: one number, text)."""
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _normal(iop: Sequence[float] | None) -> tuple[float, float, float] | None:
    """The cross product of the row and column directions (plain floats: a header is read per
    instance, and numpy costs more than the arithmetic on three-vectors)."""
    if iop is None or len(iop) != 6 or not all(math.isfinite(v) for v in iop):
        return None
    (a0, a1, a2), (b0, b1, b2) = iop[:3], iop[3:]
    return (a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0)


def read_header(path: Path) -> InstanceHeader | None:
    """The header of one DICOM instance (no pixel data read); ``image`` False for objects
    of a study that are not images (reports, plans, waveforms, an image without Rows);
    None for a DICOMDIR. ``UBCInputError`` when the header cannot be parsed or lacks the
    study and series UIDs (a damaged or truncated file). Common files are read by
    ``ubc.io.dicom_scan``, the others by pydicom."""
    scanned = scan_header(path)
    if scanned is not None:
        header = _header_of(scanned.fields, path)
        if header is None or not header.image:
            return header
        instance = None if scanned.pixels is None else _located_instance(
            scanned.fields, path, (*scanned.pixels, scanned.size, scanned.mtime_ns))
        return dataclasses.replace(header, instance=instance)
    import pydicom

    try:
        with open(path, "rb") as file:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
            header = _header_of(ds, path)
            if header is None or not header.image:
                return header
            return dataclasses.replace(header, instance=_instance_at(ds, path, file))
    except UBCInputError:
        raise
    except Exception as exc:  # pydicom raises many types on damaged files, some lazily
        raise UBCInputError(f"{path}: unreadable DICOM header ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from exc


def _header_of(ds: _Header, path: Path) -> InstanceHeader | None:
    sop = _text(ds, "SOPClassUID") or str(getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
    if sop in _SKIP_SOP_CLASSES:
        return None
    if not ds.get("StudyInstanceUID") or not ds.get("SeriesInstanceUID"):
        raise UBCInputError(f"{path}: damaged or truncated DICOM header (no Study/Series "
                            "Instance UID)")
    image = "Rows" in ds
    iop = ds.get("ImageOrientationPatient") if image else None
    if image and iop is None \
            and (item := _shared_item(ds, "PlaneOrientationSequence")) is not None:
        iop = item.get("ImageOrientationPatient")
    number = _number(ds, "SeriesNumber")
    return InstanceHeader(
        path=path, study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"), modality=_text(ds, "Modality"),
        description=_text(ds, "SeriesDescription"), protocol=_text(ds, "ProtocolName"),
        sequence_name=_text(ds, "SequenceName"),
        scanning_sequence=_text(ds, "ScanningSequence"),
        inversion_time_ms=_number(ds, "InversionTime"), echo_time_ms=_number(ds, "EchoTime"),
        image_type=_text(ds, "ImageType"), series_number=None if number is None else int(number),
        frames=int(_number(ds, "NumberOfFrames") or 1),
        normal=_normal(_floats(iop)),
        patient_id=_text(ds, "PatientID"), study_date=_text(ds, "StudyDate"),
        sop_uid=_text(ds, "SOPInstanceUID"), sop_class=sop, image=image,
        contents=_contents(ds, sop))


def _contents(ds: _Header, sop_class: str) -> str:
    """``SR``, ``RTPLAN``, ``CT without Rows``: what a non-image object is (its modality)."""
    modality = _text(ds, "Modality") or "unknown modality"
    if "Rows" in ds:
        return modality
    from pydicom.uid import UID

    is_image_class = "Image" in UID(sop_class).name if sop_class else False
    return f"{modality} image without Rows" if is_image_class else modality


# --- assembly ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Frame:
    """One 2-D frame: its dataset, index in that dataset, geometry (LPS) and rescale."""

    ds_index: int
    frame: int
    iop: tuple[float, ...]
    ipp: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float


def _seq_value(groups: Iterable[Dataset | None], sequence: str, keyword: str) -> Any:
    for group in groups:
        if group is not None and sequence in group and group[sequence].value:
            value = group[sequence].value[0].get(keyword)
            if value is not None:
                return value
    return None


def _frames_of(ds: _Header, ds_index: int, where: Path) -> list[_Frame]:
    """The frames of one instance with their geometry (single- or multi-frame)."""
    n = int(_number(ds, "NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_group = shared[0] if shared else None
    frames = []
    for f in range(n):
        group = per_frame[f] if per_frame and f < len(per_frame) else None
        groups = (group, shared_group)
        if per_frame is None:
            iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
            spacing = ds.get("PixelSpacing")
            slope, intercept = ds.get("RescaleSlope", 1.0), ds.get("RescaleIntercept", 0.0)
        else:
            iop = _seq_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
            ipp = _seq_value(groups, "PlanePositionSequence", "ImagePositionPatient")
            spacing = _seq_value(groups, "PixelMeasuresSequence", "PixelSpacing")
            slope = _seq_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _seq_value(groups, "PixelValueTransformationSequence",
                                   "RescaleIntercept")
        if iop is None or ipp is None or spacing is None:
            missing = [name for name, v in (("ImageOrientationPatient", iop),
                                            ("ImagePositionPatient", ipp),
                                            ("PixelSpacing", spacing)) if v is None]
            raise UBCInputError(f"{where}: frame {f + 1} has no {', '.join(missing)}; "
                                "cannot place it in space")
        _check_geometry(iop, ipp, spacing, where, f)
        frames.append(_Frame(ds_index, f, tuple(float(v) for v in iop),
                             (float(ipp[0]), float(ipp[1]), float(ipp[2])),
                             (float(spacing[0]), float(spacing[1])),
                             1.0 if slope in (None, "") else float(slope),
                             0.0 if intercept in (None, "") else float(intercept)))
    return frames


def _check_geometry(iop: Sequence[Any], ipp: Sequence[Any], spacing: Sequence[Any],
                    where: Path, frame: int) -> None:
    """Refuse orientation, position and spacing values no scanner writes."""
    o, p, s = ([float(v) for v in x] for x in (iop, ipp, spacing))
    if len(o) != 6 or len(p) != 3 or len(s) != 2 \
            or not all(math.isfinite(v) for v in (*o, *p, *s)):
        raise UBCInputError(f"{where}: frame {frame + 1}: ImageOrientationPatient, "
                            "ImagePositionPatient or PixelSpacing is not 6, 3 and 2 finite "
                            "numbers")
    if abs(math.hypot(*o[:3]) - 1) > 1e-2 or abs(math.hypot(*o[3:]) - 1) > 1e-2 \
            or abs(sum(a * b for a, b in zip(o[:3], o[3:], strict=True))) > 1e-2:
        raise UBCInputError(f"{where}: ImageOrientationPatient {o} is not two orthogonal "
                            "unit vectors")
    if min(s) <= 0 or max(s) > 1e3:
        raise UBCInputError(f"{where}: PixelSpacing {s} mm is not plausible")


@dataclass(frozen=True, slots=True)
class _Instance:
    """What assembling a series needs of one instance: the attributes it checks, its frames
    (geometry, ``ds_index`` 0) and where its stored values are. ``pixels``: (offset, length,
    dtype, file size, mtime) of uncompressed little-endian PixelData read at that offset; None
    when the values need pydicom (then ``dataset`` holds the whole instance). ``error``: why
    its frames cannot be placed (raised after the checks that come first)."""

    path: Path
    modality: str
    rows: int
    cols: int
    samples: int
    photometric: str
    thickness: float | None
    n_frames: int
    frames: tuple[_Frame, ...]
    error: UBCInputError | None = None
    pixels: tuple[int, int, str, int, int] | None = None
    dataset: Dataset | None = None

    def stored(self) -> np.ndarray:
        """The stored values [frames, rows, cols]."""
        if self.pixels is None:
            assert self.dataset is not None
            return _decode(self.dataset, self.path)
        offset, length, dtype, size, mtime = self.pixels
        with open(self.path, "rb") as file:
            stat = os.fstat(file.fileno())
            if (stat.st_size, stat.st_mtime_ns) != (size, mtime):  # changed since discovery
                return _decode(_read_datasets([self.path])[0], self.path)
            file.seek(offset)
            data = np.empty(length // np.dtype(dtype).itemsize, dtype)
            if file.readinto(data.data.cast("B")) != length:
                raise UBCInputError(f"{self.path}: truncated pixel data")
        return data.reshape(len(self.frames), self.rows, self.cols)


def _instance_of(ds: _Header, path: Path,
                 pixels: tuple[int, int, str, int, int] | None = None) -> _Instance:
    try:
        frames, error = tuple(_frames_of(ds, 0, path)), None
    except UBCInputError as exc:
        frames, error = (), exc
    return _Instance(path, _text(ds, "Modality") or "?", int(ds.Rows), int(ds.Columns),
                     int(ds.get("SamplesPerPixel", 1)), _text(ds, "PhotometricInterpretation"),
                     _number(ds, "SliceThickness"),
                     max(int(_number(ds, "NumberOfFrames") or 1), 1), frames, error, pixels,
                     # without located pixels, ds is pydicom's (the scan always locates them)
                     None if pixels is not None else cast("Dataset", ds))


def _plain_dtype(ds: _Header) -> np.dtype | None:
    """The dtype of stored values read as they are (little-endian, uncompressed, 8/16/32
    bits all stored), None when they need decoding."""
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed or not syntax.is_little_endian:
        return None
    bits, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0))
    if bits not in (8, 16, 32) or stored != bits:
        return None
    return np.dtype(f"<{'i' if int(ds.get('PixelRepresentation', 0)) else 'u'}{bits // 8}")


def _instance_at(ds: Dataset, path: Path, file: Any) -> _Instance | None:
    """The instance read by ``dcmread(file, stop_before_pixels=True)``, its pixels located at
    the file's position (the PixelData element, where pydicom stopped); None when anything
    is unusual (``load_series`` then reads the file with pydicom and says what is wrong)."""
    try:
        start = file.tell()
        head = file.read(12)
        explicit = not ds.file_meta.TransferSyntaxUID.is_implicit_VR
        if head[:4] != b"\xe0\x7f\x10\x00":  # (7FE0,0010) little-endian
            return None
        if explicit and head[4:6] in (b"OB", b"OW"):
            offset, length = start + 12, int.from_bytes(head[8:12], "little")
        elif not explicit:
            offset, length = start + 8, int.from_bytes(head[4:8], "little")
        else:
            return None
        stat = os.fstat(file.fileno())
        return _located_instance(ds, path, (offset, length, stat.st_size, stat.st_mtime_ns))
    except Exception:  # a header odd enough to fail here fails with its reason at load
        return None


def _located_instance(ds: _Header, path: Path,
                      pixels: tuple[int, int, int, int]) -> _Instance | None:
    """The instance whose PixelData value is at ``pixels`` (offset, length, file size,
    mtime); None when its values need pydicom (compressed, odd lengths, geometry that
    cannot be placed: ``load_series`` then says what is wrong)."""
    try:
        dtype = _plain_dtype(ds)
        offset, length, size, mtime = pixels
        frames = int(_number(ds, "NumberOfFrames") or 1)
        if dtype is None or length != int(ds.Rows) * int(ds.Columns) * frames * dtype.itemsize:
            return None  # odd lengths (padding, truncation): pydicom explains
        instance = _instance_of(ds, path, (offset, length, dtype.str, size, mtime))
        return instance if instance.error is None else None
    except Exception:
        return None


def _check_instances(instances: Sequence[_Instance], name: str) -> None:
    modalities = sorted({i.modality for i in instances})
    if modalities != ["MR"]:
        raise UBCInputError(f"{name}: modality {'/'.join(modalities)}, not MR; the model reads "
                            "MR FLAIR only")
    sizes = sorted({(i.rows, i.cols) for i in instances})
    if len(sizes) > 1:
        raise UBCInputError(f"{name}: frames of mixed sizes {sizes} in one series")
    for i in instances:
        if i.samples != 1 or i.photometric not in ("MONOCHROME2", ""):
            raise UBCInputError(f"{i.path}: {i.photometric} images are not supported "
                                "(expected MONOCHROME2 grey levels)")


def _check_frames(frames: list[_Frame], name: str) -> None:
    iops = np.array([f.iop for f in frames])
    if len(iops[0]) != 6 or np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        raise UBCInputError(f"{name}: frames of mixed orientations in one series (e.g. a "
                            "localizer with three planes); choose a single-plane series")
    spacings = np.array([f.pixel_spacing for f in frames])
    if np.abs(spacings - spacings[0]).max() > 1e-4 * max(spacings[0].max(), 1.0):
        raise UBCInputError(f"{name}: frames of mixed pixel spacing in one series")


def _stack_step(positions: np.ndarray, normal: np.ndarray, name: str,
                thickness: float | None) -> np.ndarray:
    """The step vector between consecutive sorted frames (LPS mm); refuses duplicates, gaps,
    non-uniform steps and tilted/sheared stacks."""
    if len(positions) == 1:
        if not thickness:
            raise UBCInputError(f"{name}: a single frame without SliceThickness")
        return normal * thickness
    along = positions @ normal
    steps = np.diff(along)
    if steps.min() < DUPLICATE_TOL_MM:
        at = along[1:][np.argmin(steps)]
        raise UBCInputError(f"{name}: two frames at the same position ({at:.2f} mm along the "
                            "slice normal): several echoes, time points or repeats in one "
                            "series? choose a series with one frame per position")
    step = float(np.median(steps))
    tol = max(DUPLICATE_TOL_MM, SPACING_RTOL * step)
    worst = int(np.argmax(np.abs(steps - step)))
    if abs(steps[worst] - step) > tol:
        kind = "missing slice(s): a gap of" if steps[worst] > 1.5 * step else \
            "non-uniform slice spacing: a step of"
        raise UBCInputError(f"{name}: {kind} {steps[worst]:.3f} mm between positions "
                            f"{along[worst]:.2f} and {along[worst + 1]:.2f} mm (median step "
                            f"{step:.3f} mm); refusing to resample a guessed grid")
    offsets = positions - positions[0]
    lateral = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(lateral, axis=1)
    allowed = DUPLICATE_TOL_MM + math.tan(math.radians(TILT_TOL_DEG)) * np.abs(along - along[0])
    if np.any(drift > allowed):
        angle = math.degrees(math.atan2(float(drift[-1]), abs(float(along[-1] - along[0]))))
        raise UBCInputError(f"{name}: the slices drift sideways ({angle:.2f} degrees gantry "
                            "tilt or shear); resample it to an orthogonal grid first")
    return (positions[-1] - positions[0]) / (len(positions) - 1)


def _plain_pixels(ds: Dataset) -> np.ndarray | None:
    """The stored values as a view of the PixelData bytes, for the common case that needs no
    decoding (little-endian, uncompressed, 8/16/32 bits all stored, the exact length):
    ``pixel_array`` costs 2 ms per instance more (bench/bench_dicom.py). None otherwise."""
    dtype = _plain_dtype(ds)
    if dtype is None or "PixelData" not in ds:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(_number(ds, "NumberOfFrames") or 1)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) != rows * cols * frames * dtype.itemsize:
        return None  # odd lengths (padding, truncation): pydicom explains
    return np.frombuffer(data, dtype=dtype).reshape(frames, rows, cols)


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """The stored pixel values [frames, rows, cols]; a missing decoder names its extra."""
    from pydicom.pixels import get_decoder

    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise UBCInputError(f"{path}: transfer syntax {syntax.name} cannot be decoded "
                                "by pydicom") from exc
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies)
            raise UBCInputError(f"{path}: {syntax.name} pixel data needs a decoder that is "
                                f"not installed ({needs}); e.g. pip install pylibjpeg "
                                "pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm")
    raw = _plain_pixels(ds)
    if raw is not None:
        return raw
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # truncated data, bad lengths, decoder failures
        raise UBCInputError(f"{path}: cannot read the pixel data ({type(exc).__name__}: "
                            f"{exc})") from exc
    return pixels.reshape(-1, int(ds.Rows), int(ds.Columns))


def _read_datasets(paths: Sequence[Path]) -> list[Dataset]:
    import pydicom

    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:
            raise UBCInputError(f"{path}: unreadable DICOM file ({type(exc).__name__}: "
                                f"{exc})") from exc
    return datasets


def _pixels(instances: Sequence[_Instance], frames: Sequence[_Frame]) -> np.ndarray:
    """Stored values stacked [K, rows, cols] in the order of ``frames``, rescaled."""
    if all(len(i.frames) == 1 for i in instances):  # single-frame: one copy, into place
        first = instances[frames[0].ds_index].stored()
        stack = np.empty((len(frames), *first.shape[1:]), first.dtype)
        for k, f in enumerate(frames):
            stack[k] = first[0] if k == 0 else instances[f.ds_index].stored()[0]
    else:
        decoded = [i.stored() for i in instances]
        stack = np.stack([decoded[f.ds_index][f.frame] for f in frames])
    rescale = np.array([(f.slope, f.intercept) for f in frames])
    if np.all(rescale == (1.0, 0.0)):
        return stack
    slopes = rescale[:, 0].astype(np.float32)[:, None, None]
    return stack.astype(np.float32) * slopes + rescale[:, 1].astype(np.float32)[:, None, None]


def load_series(paths: Sequence[str | os.PathLike[str]], *, name: str | None = None,
                headers: Sequence[InstanceHeader] = ()
                ) -> tuple[Volume, list[tuple[Path, int]]]:
    """Assemble the instances ``paths`` of one series into a canonical RAS ``Volume``.
    ``headers``: those discovery read of the same files (``read_header``), in any order;
    the files they describe are not parsed again (their pixels are read where the header
    located them), the others are read with pydicom.

    Returns ``(volume, sources)``: ``sources[k]`` is the (instance file, frame index in it) of
    the ``k``-th frame along the slice normal, i.e. of stored-grid slice ``k`` (what a DICOM
    SEG must reference). ``name`` names the series in errors (default: its folder).
    Refusals are ``UBCInputError`` (see the module docstring).
    """
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("a series needs at least one instance file")
    name = name or str(files[0].parent)
    known = {h.path: h.instance for h in headers if h.instance is not None}
    try:
        return _assemble(files, name, known)
    except UBCInputError:
        raise
    except Exception as exc:  # pydicom parses values lazily: a damaged file fails anywhere
        raise UBCInputError(f"{name}: malformed DICOM ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from exc


def _assemble(files: list[Path], name: str, known: dict[Path, _Instance]
              ) -> tuple[Volume, list[tuple[Path, int]]]:
    unknown = [f for f in files if f not in known]
    read = dict(zip(unknown, _read_datasets(unknown), strict=True))
    instances = [known.get(f) or _instance_of(read[f], f) for f in files]
    _check_instances(instances, name)
    rows, cols = instances[0].rows, instances[0].cols
    n_frames = sum(i.n_frames for i in instances)
    if rows * cols * n_frames > MAX_VOXELS or min(rows, cols) < 1:
        raise UBCInputError(f"{name}: {cols} x {rows} x {n_frames} voxels is empty or over "
                            f"the limit of {MAX_VOXELS} voxels")
    broken = next((i.error for i in instances if i.error is not None), None)
    if broken is not None:
        raise broken
    frames = [dataclasses.replace(fr, ds_index=i) for i, inst in enumerate(instances)
              for fr in inst.frames]
    _check_frames(frames, name)
    iop = np.asarray(frames[0].iop)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([f.ipp for f in frames])
    order = np.argsort(positions @ normal, kind="stable")
    frames = [frames[i] for i in order]
    thickness = instances[0].thickness
    step = _stack_step(positions[order], normal, name, thickness)
    row_spacing, col_spacing = frames[0].pixel_spacing
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = iop[:3] * col_spacing, iop[3:] * row_spacing
    lps[:3, 2], lps[:3, 3] = step, frames[0].ipp
    stack = _pixels(instances, frames)
    data = stack.transpose(2, 1, 0)  # (column i, row j, frame k), a view
    zooms = (col_spacing, row_spacing, float(np.linalg.norm(step)))
    sources = [(files[f.ds_index], f.frame) for f in frames]
    volume = canonical_volume(data, _LPS_TO_RAS @ lps, zooms, files[0].parent)
    return dataclasses.replace(volume, source_frames=tuple(sources)), sources


