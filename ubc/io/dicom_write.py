"""Write a volume as a DICOM MR series (test data, phantoms, benchmarks): single-frame MR
Image Storage instances or one Enhanced MR Image Storage instance, from the voxels and the
NIfTI-style affine, so that ``ubc.io.dicom`` reads back the same ``Volume`` as the NIfTI path.

Geometry: voxel ``(i, j, k)`` of ``data`` is column ``i``, row ``j`` of frame ``k``; the
affine maps ``(i, j, k)`` to RAS mm (as in NIfTI) and is converted to DICOM's LPS patient
coordinates. Needs the ``[dicom]`` extra (pydicom). Identifying attributes are synthetic.

Conformance: both forms pass dicom3tools' ``dciodvfy`` with no error (checked by
``tests/test_dicom_conformance.py``). The acquisition attributes are those of a 2D turbo
spin echo FLAIR of a brain on a 3 T scanner (head first supine, body part BRAIN, so no
Laterality); the Enhanced MR instance carries them in its functional groups, as the IOD
requires, and keeps ScanningSequence, EchoTime and InversionTime at the top level too
(standard attributes outside its IOD, a Standard Extended SOP Class) because
``ubc.io.dicom.read_header`` reads them there.
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
_FIELD_T = 3.0  # MagneticFieldStrength
_GYROMAGNETIC_MHZ_PER_T = 42.577  # 1H: TransmitterFrequency = this x field
_BRAIN = ("12738006", "SCT", "Brain")  # SNOMED CT code of BodyPartExamined BRAIN (PS3.16 L)


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
    echo_train_length: int = 16  # turbo factor; 1: a conventional spin echo
    contrast: str = "FLUID_ATTENUATED"  # Enhanced MR AcquisitionContrast (T1, T2, ...)
    pulse_sequence_name: str = "tir2d"  # Enhanced MR PulseSequenceName
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
    ds.DeviceSerialNumber, ds.SoftwareVersions = "SYNTHETIC", "ubc-synth"
    ds.BodyPartExamined, ds.PatientPosition = "BRAIN", "HFS"  # unpaired: no Laterality
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    return ds


def _selection_attributes(ds: Dataset, spec: SeriesSpec) -> None:
    """What series selection reads (``ubc.io.dicom.read_header``): MR Image module
    attributes, also written at the top level of an Enhanced MR instance."""
    ds.ScanningSequence, ds.EchoTime = spec.scanning_sequence, spec.echo_time_ms
    if spec.inversion_time_ms is not None:
        ds.InversionTime = spec.inversion_time_ms


def _mr_image(ds: Dataset, spec: SeriesSpec, thickness: float) -> None:
    """The MR Image module of a single-frame instance."""
    _selection_attributes(ds, spec)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SK", "", "2D"
    ds.RepetitionTime, ds.EchoTrainLength = spec.repetition_time_ms, spec.echo_train_length
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
        _enhanced(ds, spec, stored, order, (iop, spacing, step, origin))
        path = folder / names.format(1)
        _save(ds, path)
        return [path]
    paths = []
    for number, k in enumerate(order, start=1):
        ds = _base(spec, _MR, generate_uid(entropy_srcs=[*entropy, str(k)]), shape)
        _mr_image(ds, spec, float(np.linalg.norm(step)))
        ds.InstanceNumber = number
        ds.ImageOrientationPatient = _ds(iop)
        ds.ImagePositionPatient = _ds(origin + k * step)
        ds.PixelSpacing = _ds(spacing)
        if spec.rescale != (1.0, 0.0):  # outside the MR Image IOD, as Philips writes them
            ds.RescaleSlope, ds.RescaleIntercept = spec.rescale
            ds.RescaleType = "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = folder / names.format(number)
        _save(ds, path)
        paths.append(path)
    return paths


def _item(**values: object) -> Dataset:
    from pydicom.dataset import Dataset

    entry = Dataset()
    for keyword, value in values.items():
        setattr(entry, keyword, value)
    return entry


def _acquisition_s(spec: SeriesSpec, phase_steps: int) -> float:
    """Scan time of a 2D turbo spin echo: one TR per shot of ``echo_train_length`` lines."""
    return spec.repetition_time_ms / 1000.0 * -(-phase_steps // spec.echo_train_length)


def _description(spec: SeriesSpec) -> dict[str, object]:
    """The image-level and frame-level description of an original magnitude volume."""
    return {"PixelPresentation": "MONOCHROME", "VolumetricProperties": "VOLUME",
            "VolumeBasedCalculationTechnique": "NONE", "ComplexImageComponent": "MAGNITUDE",
            "AcquisitionContrast": spec.contrast}


def _pulse_sequence(ds: Dataset, spec: SeriesSpec, phase_steps: int) -> None:
    """MR Pulse Sequence module: a 2D Cartesian (turbo) spin echo, no EPI."""
    turbo = spec.echo_train_length > 1  # several spin echoes fill k-space lines of a frame
    ds.PulseSequenceName, ds.MRAcquisitionType, ds.EchoPulseSequence = \
        spec.pulse_sequence_name, "2D", "SPIN"
    ds.MultipleSpinEcho = "YES" if turbo else "NO"
    ds.MultiPlanarExcitation, ds.PhaseContrast, ds.TimeOfFlightContrast = "NO", "NO", "NO"
    ds.SteadyStatePulseSequence, ds.EchoPlanarPulseSequence = "NONE", "NO"
    ds.SaturationRecovery, ds.SpectrallySelectedSuppression = "NO", "NONE"
    ds.OversamplingPhase, ds.GeometryOfKSpaceTraversal = "NONE", "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE" if not turbo else \
        "FULL" if spec.echo_train_length >= phase_steps else "PARTIAL"
    ds.NumberOfKSpaceTrajectories = 1


def _mr_groups(spec: SeriesSpec, shape: tuple[int, int]) -> dict[str, object]:
    """The MR functional groups every frame shares (timing, echo, coils, ...)."""
    from pydicom.sequence import Sequence as DicomSequence

    rows, columns = shape
    ir = spec.inversion_time_ms is not None
    groups = {
        "MRTimingAndRelatedParametersSequence": _item(
            RepetitionTime=spec.repetition_time_ms, FlipAngle=90.0,
            EchoTrainLength=spec.echo_train_length, RFEchoTrainLength=spec.echo_train_length,
            GradientEchoTrainLength=0, SpecificAbsorptionRateSequence=DicomSequence([_item(
                SpecificAbsorptionRateDefinition="IEC_HEAD", SpecificAbsorptionRateValue=1.0)]),
            OperatingModeSequence=DicomSequence([
                _item(OperatingModeType=kind, OperatingMode="IEC_NORMAL")
                for kind in ("STATIC FIELD", "RF", "GRADIENT")])),
        "MRFOVGeometrySequence": _item(
            InPlanePhaseEncodingDirection="ROW", MRAcquisitionFrequencyEncodingSteps=rows,
            MRAcquisitionPhaseEncodingStepsInPlane=columns, PercentSampling=100.0,
            PercentPhaseFieldOfView=100.0),
        "MREchoSequence": _item(EffectiveEchoTime=spec.echo_time_ms),
        "MRModifierSequence": _item(
            InversionRecovery="YES" if ir else "NO", FlowCompensation="NONE",
            T2Preparation="NO", SpectrallySelectedExcitation="NONE",
            SpatialPresaturation="NONE", PartialFourier="NO", ParallelAcquisition="NO",
            **({"InversionTimes": [spec.inversion_time_ms]} if ir else {})),
        "MRImagingModifierSequence": _item(
            MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
            TransmitterFrequency=_FIELD_T * _GYROMAGNETIC_MHZ_PER_T, PixelBandwidth=200.0),
        "MRReceiveCoilSequence": _item(
            ReceiveCoilName="HEAD", ReceiveCoilManufacturerName="", ReceiveCoilType="VOLUME",
            QuadratureReceiveCoil="YES"),
        "MRTransmitCoilSequence": _item(
            TransmitCoilName="BODY", TransmitCoilManufacturerName="", TransmitCoilType="BODY"),
        "MRAveragesSequence": _item(NumberOfAverages=1.0),
        "FrameAnatomySequence": _item(FrameLaterality="U", AnatomicRegionSequence=DicomSequence(
            [_item(CodeValue=_BRAIN[0], CodingSchemeDesignator=_BRAIN[1],
                   CodeMeaning=_BRAIN[2])])),
    }
    return {name: DicomSequence([value]) for name, value in groups.items()}


def _dimensions(ds: Dataset, organization: str) -> None:
    """Frames indexed by (StackID, InStackPositionNumber) of their Frame Content."""
    from pydicom.tag import Tag

    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=organization)]
    ds.DimensionIndexSequence = [
        _item(DimensionOrganizationUID=organization, DimensionIndexPointer=Tag(keyword),
              FunctionalGroupPointer=Tag("FrameContentSequence"),
              DimensionDescriptionLabel=label)
        for keyword, label in (("StackID", "Stack"), ("InStackPositionNumber", "Position"))]


def _enhanced(ds: Dataset, spec: SeriesSpec, stored: np.ndarray, order: list[int],
              geometry: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    iop, spacing, step, origin = geometry
    image_type = ["ORIGINAL", "PRIMARY", spec.contrast, "NONE"]
    thickness = _ds(np.array([float(np.linalg.norm(step))]))[0]
    started = f"{spec.study_date}120000"
    duration_s = _acquisition_s(spec, int(ds.Columns))
    ds.ImageType, ds.InstanceNumber, ds.NumberOfFrames = image_type, 1, len(order)
    ds.ContentQualification, ds.ImageComments = "PRODUCT", ""
    ds.BurnedInAnnotation, ds.LossyImageCompression, ds.PresentationLUTShape = \
        "NO", "00", "IDENTITY"
    ds.AcquisitionDateTime, ds.AcquisitionDuration = started, duration_s
    ds.ResonantNucleus, ds.KSpaceFiltering, ds.MagneticFieldStrength = "1H", "NONE", _FIELD_T
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.AcquisitionContextSequence = DicomSequence()
    for keyword, value in _description(spec).items():
        setattr(ds, keyword, value)
    _selection_attributes(ds, spec)
    _pulse_sequence(ds, spec, int(ds.Columns))
    _dimensions(ds, generate_uid(entropy_srcs=[spec.series_uid, "dimensions"]))
    ds.SharedFunctionalGroupsSequence = DicomSequence([_item(
        PixelMeasuresSequence=DicomSequence([_item(
            PixelSpacing=_ds(spacing), SliceThickness=thickness,
            SpacingBetweenSlices=thickness)]),
        PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=_ds(iop))]),
        PixelValueTransformationSequence=DicomSequence([_item(
            RescaleSlope=spec.rescale[0], RescaleIntercept=spec.rescale[1],
            RescaleType="US")]),
        MRImageFrameTypeSequence=DicomSequence([_item(FrameType=image_type,
                                                      **_description(spec))]),
        **_mr_groups(spec, (int(ds.Rows), int(ds.Columns))))])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([_item(
        PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=_ds(origin + k * step))]),
        FrameContentSequence=DicomSequence([_item(
            FrameAcquisitionDateTime=started, FrameReferenceDateTime=started,
            FrameAcquisitionDuration=duration_s * 1000.0, StackID="1",
            InStackPositionNumber=k + 1, DimensionIndexValues=[1, k + 1])]))
        for k in order])
    ds.PixelData = np.ascontiguousarray(stored[:, :, order].transpose(2, 1, 0)).tobytes()
