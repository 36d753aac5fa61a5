"""Write a volume as a DICOM MR series (test data, phantoms, benchmarks): single-frame MR
Image Storage instances or one Enhanced MR Image Storage instance, from the voxels and the
NIfTI-style affine, so that ``ubc.io.dicom`` reads back the same ``Volume`` as the NIfTI path.

Geometry: voxel ``(i, j, k)`` of ``data`` is column ``i``, row ``j`` of frame ``k``; the
affine maps ``(i, j, k)`` to RAS mm (as in NIfTI) and is converted to DICOM's LPS patient
coordinates. Needs the ``[dicom]`` extra (pydicom). Identifying attributes are synthetic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["SeriesSpec", "write_series"]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_MR = "1.2.840.10008.5.1.4.1.1.4"
_ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


@dataclass(frozen=True)
class SeriesSpec:
    """What a written series says about itself (MR acquisition attributes included, so that
    series selection has something to go by). ``inversion_time_ms`` None: no IR."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    description: str = "AX T2 FLAIR"
    series_number: int = 1
    patient_id: str = "ANON"
    study_date: str = "20000101"
    scanning_sequence: str = "SE\\IR"
    inversion_time_ms: float | None = 2500.0
    echo_time_ms: float = 120.0
    repetition_time_ms: float = 9000.0
    modality: str = "MR"
    rescale: tuple[float, float] = (1.0, 0.0)  # (slope, intercept): stored = (v - b) / m
    extra: dict[str, object] = field(default_factory=dict)


def _geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(IOP [6], PixelSpacing [row, col], slice step vector [3], origin [3]) in LPS mm."""
    lps = _LPS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step = lps[:3, 0], lps[:3, 1]
    spacing = np.array([np.linalg.norm(row_step), np.linalg.norm(col_step)])
    iop = np.concatenate([col_step / spacing[1], row_step / spacing[0]])
    return iop, spacing, lps[:3, 2], lps[:3, 3]


def _base(spec: SeriesSpec, sop_class: str, sop_uid: str, shape: tuple[int, int]) -> Dataset:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = spec.study_uid, spec.series_uid
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Modality, ds.SeriesNumber = spec.modality, spec.series_number
    ds.SeriesDescription = ds.ProtocolName = spec.description
    ds.PatientName, ds.PatientID = "Phantom^Synthetic", spec.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = spec.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Manufacturer, ds.ManufacturerModelName = "UBC", "ubc-synth"
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    return ds


def _mr_attributes(ds: Dataset, spec: SeriesSpec, thickness: float) -> None:
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = spec.scanning_sequence, "SK", ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime, ds.RepetitionTime = spec.echo_time_ms, spec.repetition_time_ms
    if spec.inversion_time_ms is not None:
        ds.InversionTime = spec.inversion_time_ms
    ds.SliceThickness = ds.SpacingBetweenSlices = _ds(np.array([thickness]))[0]


def _ds(values: np.ndarray) -> list[object]:
    """Decimal strings as precise as DICOM's 16 characters allow."""
    from pydicom.valuerep import DSfloat

    return [DSfloat(float(v), auto_format=True) for v in values]


def _stored(data: np.ndarray, spec: SeriesSpec) -> np.ndarray:
    slope, intercept = spec.rescale
    stored = np.rint((np.asarray(data, dtype=np.float64) - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ValueError("voxels do not fit int16 with this rescale")
    return stored.astype("<i2")


def _save(ds: Dataset, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def write_series(data: np.ndarray, affine: np.ndarray, folder: str | os.PathLike[str],
                 spec: SeriesSpec, *, multiframe: bool = False, names: str = "IM{:04d}.dcm",
                 order: Sequence[int] | None = None) -> list[Path]:
    """Write ``data`` [I, J, K] (any real dtype; stored as int16 through ``spec.rescale``)
    with ``affine`` (voxel -> RAS mm) under ``folder``; returns the files written.

    ``order``: the slices in the order written (default 0..K-1): the instance numbering and
    file names (``names`` formatted with 1, 2, ...), or the frame order of ``multiframe`` (one
    Enhanced MR instance holding every frame); otherwise one MR instance per slice.
    """
    from pydicom.uid import generate_uid

    if data.ndim != 3:
        raise ValueError(f"data must be 3-D, got shape {data.shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    iop, spacing, step, origin = _geometry(affine)
    stored = _stored(data, spec)
    shape = (data.shape[1], data.shape[0])  # (rows, columns)
    entropy = [spec.series_uid]
    order = [int(k) for k in order] if order is not None else list(range(data.shape[2]))
    if multiframe:
        uid = generate_uid(entropy_srcs=[*entropy, "mf"])
        ds = _base(spec, _ENHANCED_MR, uid, shape)
        _enhanced(ds, spec, stored, order, iop, spacing, step, origin)
        path = folder / names.format(1)
        _save(ds, path)
        return [path]
    paths = []
    for number, k in enumerate(order, start=1):
        ds = _base(spec, _MR, generate_uid(entropy_srcs=[*entropy, str(k)]), shape)
        _mr_attributes(ds, spec, float(np.linalg.norm(step)))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.InstanceNumber = number
        ds.ImageOrientationPatient = _ds(iop)
        ds.ImagePositionPatient = _ds(origin + k * step)
        ds.PixelSpacing = _ds(spacing)
        ds.RescaleSlope, ds.RescaleIntercept = spec.rescale
        ds.RescaleType = "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / names.format(number)
        _save(ds, path)
        paths.append(path)
    return paths


def _enhanced(ds: Dataset, spec: SeriesSpec, stored: np.ndarray, order: list[int],
              iop: np.ndarray,
              spacing: np.ndarray, step: np.ndarray, origin: np.ndarray) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    def item(**values: object) -> Dataset:
        entry = Dataset()
        for keyword, value in values.items():
            setattr(entry, keyword, value)
        return entry

    n = len(order)
    thickness = float(np.linalg.norm(step))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber, ds.NumberOfFrames = 1, n
    ds.ContentQualification, ds.ImageComments = "PRODUCT", ""
    _mr_attributes(ds, spec, thickness)
    shared = item(
        PixelMeasuresSequence=DicomSequence([item(
            PixelSpacing=_ds(spacing), SliceThickness=_ds(np.array([thickness]))[0],
            SpacingBetweenSlices=_ds(np.array([thickness]))[0])]),
        PlaneOrientationSequence=DicomSequence([item(
            ImageOrientationPatient=_ds(iop))]),
        PixelValueTransformationSequence=DicomSequence([item(
            RescaleSlope=spec.rescale[0], RescaleIntercept=spec.rescale[1],
            RescaleType="US")]))
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([
        item(PlanePositionSequence=DicomSequence([item(
            ImagePositionPatient=_ds(origin + k * step))]),
             FrameContentSequence=DicomSequence([item(InStackPositionNumber=k + 1,
                                                      StackID="1")]))
        for k in order])
    ds.PixelData = np.ascontiguousarray(stored[:, :, order].transpose(2, 1, 0)).tobytes()
