"""DICOM out: the predicted lesion mask as a DICOM Segmentation that PACS viewers overlay on
the source series.

- Binary segmentation, one segment ``lesion``: property category SNOMED CT 49755003
  "Morphologically abnormal structure", type SNOMED CT 52988006 "Lesion", anatomic region
  SNOMED CT 12738006 "Brain"; algorithm type AUTOMATIC, named by the bundle.
- It references every source instance (and frame), so viewers align it without resampling:
  the mask is written on the source's own grid (columns, rows, frames), one SEG frame per
  source frame. The frames go along the slice normal in the direction of the column cosines
  x the row cosines (the order highdicom gives them); each names its source instance, the
  source frame number when the source is one multi-frame instance, and the source frame's
  ImagePositionPatient, by which readers (``read_seg``, highdicom, viewers) match them.
- Empty frames are kept: one SEG frame per source frame, so a reader maps frames one to
  one, and a study with no predicted lesion still gets a valid, all-zero SEG. The cost is
  rows x columns / 8 bytes per empty frame (7 kB at 240 x 240).
- The grade is not written as DICOM: it stays in the results row (JSON lines, CSV or
  Parquet). A structured report (TID 1500) would need coded concepts for "P(HGG)" that no
  standard terminology has, PACS rarely display SR content, and the row already carries the
  study and series UIDs that join it to the SEG. The SEG's ContentDescription names the model.
- No identifying attribute is added; patient and study attributes are copied from the source,
  as the standard requires for the SEG to join the study.
- Its series and instance UIDs derive from the source instances and the model's version (a
  hash, under pydicom's UID root): the same series scored by the same model again gives the
  same SEG, so a SEG sent twice (a node killed between sending it and writing its row) is
  one instance in the PACS.

How it is written: attribute for attribute, the SEG highdicom 0.28 makes of the same inputs,
but built here, because highdicom's generic construction (plane positions, per-frame
functional groups as pydicom datasets, IOD checks) and pydicom's writer over its ~1,400
nested datasets cost 330 ms per BraTS volume (240 x 240 x 155). Only the first source file
is read with pydicom (patient, study, frame of reference, orientation, pixel measures); the
others with ``read_header``. The repetitive sequences (per-frame functional groups,
referenced instances) and the bit-packed pixel data are encoded here, explicit VR little
endian, and put in tag order among what pydicom writes of the rest. It differs from
highdicom's where that named highdicom (no "highdicom" contributing-equipment item, pydicom's
implementation UID in the file meta, a DimensionOrganizationUID derived like the SEG's UIDs
where highdicom drew a random one), in the NUL byte that pads an odd-length PixelData
(highdicom's is "0"), and in the DS strings of the positions of single-frame sources other
than the first, which ``read_header`` gives as numbers: the same numbers, in pydicom's short
form ("-4.585221142576" where the source wrote "-4.5852211425760"). highdicom still reads
SEGs (``read_seg``, tests).
"""

from __future__ import annotations

import copy
import datetime
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ubc.atomic import atomic_write
from ubc.errors import UBCInputError
from ubc.io.dicom import InstanceHeader, read_header

if TYPE_CHECKING:
    import pydicom

__all__ = ["write_seg", "read_seg"]

SERIES_NUMBER = 9901  # high, so the SEG sorts after the scanner's series
#: Type 2 attributes of the SEG's Patient and General Study modules taken from the source:
#: written empty when the source lacks them (converters such as nii2dcm omit StudyID)
_TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                      "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                      "AccessionNumber")
#: Type 1 attributes the SEG needs from its source and cannot derive
_TYPE1_FROM_SOURCE = ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID",
                      "FrameOfReferenceUID")
_PATIENT_SEX = {"M", "F", "O"}
#: the root attributes of the Patient, Clinical Trial Subject, General Study, Patient Study,
#: Clinical Trial Study and Specimen modules (PS3.3): those the source has are copied
_COPIED_FROM_SOURCE = tuple("""
    ReferencedPatientSequence PatientName PatientID IssuerOfPatientID TypeOfPatientID
    IssuerOfPatientIDQualifiersSequence SourcePatientGroupIdentificationSequence
    GroupOfPatientsIdentificationSequence PatientBirthDate PatientBirthTime
    PatientBirthDateInAlternativeCalendar PatientDeathDateInAlternativeCalendar
    PatientAlternativeCalendar PatientSex QualityControlSubject StrainDescription
    StrainNomenclature StrainStockSequence StrainAdditionalInformation StrainCodeSequence
    GeneticModificationsSequence OtherPatientNames OtherPatientIDsSequence
    ReferencedPatientPhotoSequence EthnicGroupCodeSequence PatientSpeciesDescription
    PatientSpeciesCodeSequence PatientBreedDescription PatientBreedCodeSequence
    BreedRegistrationSequence ResponsiblePerson ResponsiblePersonRole ResponsibleOrganization
    PatientComments PatientIdentityRemoved DeidentificationMethod
    DeidentificationMethodCodeSequence ClinicalTrialSponsorName ClinicalTrialProtocolID
    ClinicalTrialProtocolName IssuerOfClinicalTrialProtocolID
    OtherClinicalTrialProtocolIDsSequence ClinicalTrialSiteID ClinicalTrialSiteName
    IssuerOfClinicalTrialSiteID ClinicalTrialSubjectID IssuerOfClinicalTrialSubjectID
    ClinicalTrialSubjectReadingID IssuerOfClinicalTrialSubjectReadingID
    ClinicalTrialProtocolEthicsCommitteeName
    ClinicalTrialProtocolEthicsCommitteeApprovalNumber StudyDate StudyTime AccessionNumber
    IssuerOfAccessionNumberSequence ReferringPhysicianName
    ReferringPhysicianIdentificationSequence ConsultingPhysicianName
    ConsultingPhysicianIdentificationSequence StudyDescription ProcedureCodeSequence
    PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence NameOfPhysiciansReadingStudy
    PhysiciansReadingStudyIdentificationSequence ReferencedStudySequence StudyInstanceUID
    StudyID RequestingService RequestingServiceCodeSequence
    ReasonForPerformedProcedureCodeSequence AdmittingDiagnosesDescription
    AdmittingDiagnosesCodeSequence PatientAge PatientSize PatientSizeCodeSequence
    PatientBodyMassIndex MeasuredAPDimension MeasuredLateralDimension PatientWeight
    MedicalAlerts Allergies Occupation SmokingStatus AdditionalPatientHistory PregnancyStatus
    LastMenstrualDate PatientSexNeutered ReasonForVisit ReasonForVisitCodeSequence AdmissionID
    IssuerOfAdmissionIDSequence ServiceEpisodeID ServiceEpisodeDescription
    IssuerOfServiceEpisodeIDSequence PatientState ClinicalTrialTimePointID
    ClinicalTrialTimePointDescription LongitudinalTemporalOffsetFromEvent
    LongitudinalTemporalEventType ClinicalTrialTimePointTypeCodeSequence
    IssuerOfClinicalTrialTimePointID ConsentForClinicalTrialUseSequence ContainerIdentifier
    IssuerOfTheContainerIdentifierSequence AlternateContainerIdentifierSequence
    ContainerTypeCodeSequence ContainerDescription ContainerComponentSequence
    SpecimenDescriptionSequence""".split())
#: what the acquisition-equipment item of ContributingEquipmentSequence copies from the source
_EQUIPMENT_FROM_SOURCE = ("Manufacturer", "ManufacturerModelName", "InstitutionName",
                          "InstitutionalDepartmentName", "InstitutionAddress", "StationName",
                          "DeviceSerialNumber", "SoftwareVersions")
_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_SPACING_RTOL = 1e-2  # highdicom's tolerances for a regularly spaced stack of frames
_PERPENDICULAR_TOL = 1e-3


# --- the source frames ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _SourceFrame:
    """A source frame as the SEG frame over it references it."""

    sop_class: str
    sop_uid: str
    series_uid: str
    number: int | None  # 1-based frame number in a multi-frame instance
    orientation: tuple[float, ...]  # ImageOrientationPatient
    position: tuple[float, float, float]  # ImagePositionPatient, LPS mm
    position_text: str  # the same, as the SEG writes it


def _source_frames(sources: Sequence[tuple[Path, int]]) -> tuple[list[Path], bool]:
    files = list(dict.fromkeys(path for path, _ in sources))
    multiframe = len(files) < len(sources)
    if multiframe and len(files) != 1:
        raise ValueError("a SEG over several multi-frame instances is not supported")
    return files, multiframe


def _source_header(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    """``ds`` with every Type 2 attribute the SEG copies present (empty when missing or
    not a valid value); ``UBCInputError`` naming a missing Type 1 attribute."""
    missing = [keyword for keyword in _TYPE1_FROM_SOURCE if not ds.get(keyword)]
    if missing:
        raise UBCInputError(f"{path}: the source instance lacks {', '.join(missing)} "
                            "(Type 1), which a DICOM SEG must reference")
    for keyword in _TYPE2_FROM_SOURCE:
        if keyword not in ds:
            setattr(ds, keyword, None)
    if ds.PatientSex not in _PATIENT_SEX:
        ds.PatientSex = None  # e.g. "U" or lower case: not a value the SEG may carry
    return ds


def _ds_text(values: Iterable[float]) -> str:
    """DS values as highdicom writes them: the source's own strings where pydicom kept them,
    else pydicom's short form of the number."""
    from pydicom.valuerep import DS

    return "\\".join(str(DS(value, auto_format=True)) for value in values)


def _frame(ds: pydicom.Dataset, number: int | None, orientation: Sequence[float],
           position: Sequence[float]) -> _SourceFrame:
    return _SourceFrame(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                        str(ds.SeriesInstanceUID), number, tuple(float(v) for v in orientation),
                        (float(position[0]), float(position[1]), float(position[2])),
                        _ds_text(position))


def _frames_of_dataset(ds: pydicom.Dataset) -> list[_SourceFrame]:
    """The frames of an instance read by pydicom; a multi-frame one's orientation is the
    shared one (as highdicom requires)."""
    if "PerFrameFunctionalGroupsSequence" not in ds:
        return [_frame(ds, None, ds.ImageOrientationPatient, ds.ImagePositionPatient)]
    orientation = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0] \
        .ImageOrientationPatient
    return [_frame(ds, n, orientation, group.PlanePositionSequence[0].ImagePositionPatient)
            for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence, 1)]


def _frame_of_file(path: Path, header: InstanceHeader | None) -> _SourceFrame:
    """The frame of a single-frame instance other than the first: from its ``read_header``,
    or from pydicom where that did not locate it (compressed, unusual)."""
    if header is None or header.instance is None or len(header.instance.frames) != 1:
        import pydicom

        frames = _frames_of_dataset(pydicom.dcmread(path, stop_before_pixels=True))
        if len(frames) != 1:
            raise ValueError("a SEG over several multi-frame instances is not supported")
        return frames[0]
    if not header.sop_uid or not header.sop_class:
        raise ValueError(f"{path} has no SOPInstanceUID or SOPClassUID")
    frame = header.instance.frames[0]
    return _SourceFrame(header.sop_class, header.sop_uid, header.series_uid, None,
                        frame.iop, frame.ipp, _ds_text(frame.ipp))


def _read_sources(files: list[Path], known: Mapping[Path, InstanceHeader]
                  ) -> tuple[pydicom.Dataset, dict[Path, list[_SourceFrame]]]:
    """The first source instance (checked by ``_source_header``) and the frames of each
    (from ``known`` headers where given, else read)."""
    import pydicom

    try:
        read = pydicom.dcmread(files[0], stop_before_pixels=True)
        headers = [known.get(path) or read_header(path) for path in files[1:]]
    except Exception as exc:  # read_header's UBCInputError for a damaged file included
        raise _unreadable(files, exc) from exc
    first = _source_header(read, files[0])
    try:
        frames = {files[0]: _frames_of_dataset(first)}
        if len(files) > 1 and frames[files[0]][0].number is not None:
            raise ValueError("a SEG over several multi-frame instances is not supported")
        frames.update((path, [_frame_of_file(path, header)])
                      for path, header in zip(files[1:], headers, strict=True))
    except Exception as exc:  # pydicom parses values lazily: a damaged file fails anywhere
        raise _unreadable(files, exc) from exc
    return first, frames


def _unreadable(files: list[Path], exc: Exception) -> UBCInputError:
    return UBCInputError(f"{files[0].parent}: cannot re-read the source series for the SEG "
                         f"({type(exc).__name__}: {exc})")


# --- geometry, as highdicom derives it -------------------------------------------------
def _normal(orientation: Sequence[float]) -> np.ndarray:
    """The normal highdicom orders frames along: column cosines x row cosines."""
    iop = np.asarray(orientation, dtype=np.float64)
    return np.cross(iop[3:], iop[:3])


def _seg_order(positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """The source frames (indices into ``positions``) in SEG frame order: by distance along
    ``normal``."""
    distances = (normal[None] @ positions.T)[0]
    unique, first = np.unique(distances, return_index=True)
    if len(unique) < len(positions):
        raise ValueError("two source frames at the same position")
    return first


def _regular_spacing(positions: np.ndarray, normal: np.ndarray, *,
                     by_distance: bool) -> float | None:
    """highdicom's ``get_volume_positions``: the spacing of frames at ``positions`` (1.0 for
    one) when regularly spaced along ``normal``, else None. The distinct positions are taken
    in np.unique's (lexicographic) order, which highdicom keeps when it does not sort them
    (``by_distance`` False)."""
    unique = np.unique(positions, axis=0)
    if len(unique) < len(positions):
        return None
    if len(unique) == 1:
        return 1.0
    distances = (normal[None] @ unique.T)[0]
    order = np.argsort(distances) if by_distance else np.arange(len(unique))
    along = distances[order]
    spacing = (along[-1] - along[0]) / (len(along) - 1)
    if not np.isclose(np.diff(along), spacing, rtol=_SPACING_RTOL, atol=0.0).all():
        return None
    spans = unique[order[1:]] - unique[order[0]]
    spans /= np.linalg.norm(spans, axis=1)[:, None]
    if not (np.abs(np.abs(spans @ normal) - 1.0) < _PERPENDICULAR_TOL).all():
        return None
    return float(abs(spacing))


# --- the attributes pydicom writes --------------------------------------------------------
def _set(ds: pydicom.Dataset, values: dict[str, object]) -> pydicom.Dataset:
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _item(**values: object) -> pydicom.Dataset:
    from pydicom import Dataset

    return _set(Dataset(), values)


def _code_item(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _segment(name: str, version: str) -> pydicom.Dataset:
    algorithm = _item(
        AlgorithmFamilyCodeSequence=[_code_item("123110", "DCM", "Artificial Intelligence")],
        AlgorithmVersion=version, AlgorithmName=name)
    return _item(
        SegmentNumber=1, SegmentLabel="lesion",
        SegmentedPropertyCategoryCodeSequence=[
            _code_item("49755003", "SCT", "Morphologically Abnormal Structure")],
        SegmentedPropertyTypeCodeSequence=[_code_item("52988006", "SCT", "Lesion")],
        AnatomicRegionSequence=[_code_item("12738006", "SCT", "Brain")],
        SegmentAlgorithmType="AUTOMATIC", SegmentAlgorithmName=name,
        SegmentationAlgorithmIdentificationSequence=[algorithm])


def _acquisition_equipment(source: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The ContributingEquipmentSequence item naming the source's scanner (none without a
    Manufacturer)."""
    if not source.get("Manufacturer"):
        return []
    item = _item(**{keyword: source[keyword].value for keyword in _EQUIPMENT_FROM_SOURCE
                    if keyword in source})
    if "AcquisitionDateTime" in source:
        item.ContributionDateTime = source.AcquisitionDateTime
    item.ContributionDescription = "Acquisition equipment of the source image(s)"
    item.PurposeOfReferenceCodeSequence = [_code_item("109101", "DCM", "Acquisition Equipment")]
    return [item]


def _dimension_index(organization_uid: str) -> list[pydicom.Dataset]:
    return [_item(DimensionOrganizationUID=organization_uid, DimensionIndexPointer=0x0062000B,
                  FunctionalGroupPointer=0x0062000A,
                  DimensionDescriptionLabel="Referenced Segment Number"),
            _item(DimensionOrganizationUID=organization_uid, DimensionIndexPointer=0x00200032,
                  FunctionalGroupPointer=0x00209113,
                  DimensionDescriptionLabel="Image Position Patient")]


def _shared_groups(source: pydicom.Dataset, spacing: float | None) -> pydicom.Dataset:
    """The orientation and pixel measures of the first source (a multi-frame one's shared
    groups as they are), SpacingBetweenSlices added when it has none, and the one segment."""
    from pydicom.valuerep import DS, format_number_as_ds

    if "PerFrameFunctionalGroupsSequence" in source:
        shared = source.SharedFunctionalGroupsSequence[0]
        orientation = copy.deepcopy(shared.PlaneOrientationSequence)
        measures = copy.deepcopy(shared.PixelMeasuresSequence)
    else:
        orientation = [_item(ImageOrientationPatient=[
            DS(v, auto_format=True) for v in source.ImageOrientationPatient])]
        measures = [_item(PixelSpacing=[DS(v, auto_format=True) for v in source.PixelSpacing])]
        for keyword in ("SliceThickness", "SpacingBetweenSlices"):
            if source.get(keyword) is not None:
                setattr(measures[0], keyword, DS(source.get(keyword), auto_format=True))
    if "SpacingBetweenSlices" not in measures[0] and spacing is not None:
        measures[0].SpacingBetweenSlices = format_number_as_ds(spacing)
    return _item(PlaneOrientationSequence=orientation, PixelMeasuresSequence=measures,
                 SegmentIdentificationSequence=[_item(ReferencedSegmentNumber=1)])


def _seg_attributes(source: pydicom.Dataset, *, uids: Sequence[str], name: str,
                    version: str, description: str, frames: int, spacing: float | None,
                    three_d: bool) -> pydicom.Dataset:
    """The SEG but its references to the source instances, per-frame functional groups and
    pixel data. ``uids``: its series, instance and dimension organization UIDs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.valuerep import DA, TM

    series_uid, instance_uid, organization_uid = uids
    seg = Dataset()
    seg.file_meta = FileMetaDataset()
    _set(seg.file_meta, {"MediaStorageSOPClassUID": _SEG_STORAGE,
                         "MediaStorageSOPInstanceUID": instance_uid,
                         "TransferSyntaxUID": _EXPLICIT_VR_LITTLE_ENDIAN})
    for keyword in ("SpecificCharacterSet", *_COPIED_FROM_SOURCE):
        if keyword in source:
            seg.add(source[keyword])
    now = datetime.datetime.now()
    _set(seg, {
        "SOPClassUID": _SEG_STORAGE, "SOPInstanceUID": instance_uid,
        "InstanceCreationDate": DA(now.date()), "InstanceCreationTime": TM(now.time()),
        "ContentDate": DA(now.date()), "ContentTime": TM(now.time()),
        "Modality": "SEG", "SeriesInstanceUID": series_uid, "SeriesNumber": SERIES_NUMBER,
        "SeriesDescription": "UBC lesion", "InstanceNumber": 1,
        "Manufacturer": "UBC", "ManufacturerModelName": name, "SoftwareVersions": version,
        "DeviceSerialNumber": "0",
        "FrameOfReferenceUID": source.FrameOfReferenceUID,
        "PositionReferenceIndicator": source.get("PositionReferenceIndicator"),
        "ImageType": ["DERIVED", "PRIMARY"], "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2", "PresentationLUTShape": "IDENTITY",
        "NumberOfFrames": frames, "Rows": source.Rows, "Columns": source.Columns,
        "BitsAllocated": 1, "BitsStored": 1, "HighBit": 0, "PixelRepresentation": 0,
        "LossyImageCompression": source.get("LossyImageCompression", "00"),
        "SegmentationType": "BINARY", "SegmentsOverlap": "NO",
        "SegmentSequence": [_segment(name, version)],
        "ContentLabel": "LESION", "ContentDescription": description,
        "DimensionOrganizationSequence": [_item(DimensionOrganizationUID=organization_uid)],
        "DimensionIndexSequence": _dimension_index(organization_uid),
        "SharedFunctionalGroupsSequence": [_shared_groups(source, spacing)]})
    if three_d:
        seg.DimensionOrganizationType = "3D"
    if seg.LossyImageCompression == "01":
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(seg, keyword, source[keyword].value)
    if equipment := _acquisition_equipment(source):
        seg.ContributingEquipmentSequence = equipment
    return seg


# --- the elements encoded here ------------------------------------------------------------
_TEXT_VRS = {b"CS", b"DS", b"IS", b"LO", b"SH"}  # padded with a space, the others with NUL
_LONG_VRS = {b"OB", b"SQ"}  # a reserved field and a 4-byte length (PS3.5 7.1.2)


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One data element, explicit VR little endian, its value padded to an even length."""
    if len(value) % 2:
        value += b" " if vr in _TEXT_VRS else b"\0"
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr)
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _text(tag: int, vr: bytes, text: str) -> bytes:
    return _element(tag, vr, text.encode("ascii"))


def _sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence of defined length; ``items``: each item's elements, in tag order."""
    return _element(tag, b"SQ", b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
                                         for item in items))


def _code(value: str, scheme: str, meaning: str) -> bytes:
    return (_text(0x00080100, b"SH", value) + _text(0x00080102, b"SH", scheme)
            + _text(0x00080104, b"LO", meaning))


def _reference(sop_class: str, sop_uid: str) -> bytes:
    return _text(0x00081150, b"UI", sop_class) + _text(0x00081155, b"UI", sop_uid)


#: what every SEG frame says of its source frame after naming it
_SOURCE_IMAGE_TAIL = (
    _text(0x0028135A, b"CS", "YES")  # SpatialLocationsPreserved
    + _sequence(0x0040A170, [_code("121322", "DCM",  # PurposeOfReferenceCodeSequence
                                   "Source image for image processing operation")]))
_DERIVATION_CODE = _sequence(0x00089215, [_code("113076", "DCM", "Segmentation")])


def _frame_groups(frame: _SourceFrame, position: int) -> bytes:
    """The per-frame functional groups of the SEG frame ``position`` (1-based, along the
    normal) over ``frame``: derivation, dimension index values, plane position."""
    source = _reference(frame.sop_class, frame.sop_uid)
    if frame.number is not None:
        source += _text(0x00081160, b"IS", str(frame.number))  # ReferencedFrameNumber
    derivation = _sequence(0x00082112, [source + _SOURCE_IMAGE_TAIL]) + _DERIVATION_CODE
    return (_sequence(0x00089124, [derivation])  # DerivationImageSequence
            + _sequence(0x00209111, [_element(0x00209157, b"UL",  # DimensionIndexValues
                                              struct.pack("<2I", 1, position))])
            + _sequence(0x00209113, [_text(0x00200032, b"DS", frame.position_text)]))


def _pixel_data(mask: np.ndarray, order: np.ndarray) -> bytes:
    """The SEG frames (mask slices ``order``, each [row j, column i]) as one stream of bits,
    little-endian within a byte, frames not padded to whole bytes (as highdicom packs them).
    The pipeline's masks are in Fortran order, where each frame is already contiguous."""
    frames = mask.transpose(2, 1, 0)[order]
    return np.packbits(frames != 0, bitorder="little").tobytes()


def _write(path: Path, seg: pydicom.Dataset, encoded: dict[int, bytes]) -> None:
    """``seg`` as pydicom writes it, with the elements ``encoded`` (tag: bytes) in tag order."""
    from pydicom.charset import default_encoding
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    encoding = seg.get("SpecificCharacterSet", default_encoding)
    with open(path, "wb") as file:
        fp = DicomFileLike(file)
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, seg.file_meta, enforce_standard=True)
        fp.is_little_endian, fp.is_implicit_VR = True, False
        start = 0
        for tag in sorted(encoded):
            write_dataset(fp, seg[start:tag], encoding)
            fp.write(encoded[tag])
            start = tag + 1
        write_dataset(fp, seg[start:], encoding)


# --- write and read -------------------------------------------------------------------------
def _seg_uid(sop_uids: Iterable[str], version: str, what: str) -> str:
    """The SEG's series, instance or dimension organization UID (``what``), derived from the
    source instances and the model: scoring the same series with the same model again (a run
    killed after it sent the SEG, before its row was written) makes the same SEG, which a
    PACS keeps once."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["ubc-seg", what, version, *sorted(sop_uids)]))


def write_seg(mask: np.ndarray, sources: Sequence[tuple[Path, int]],
              path: str | os.PathLike[str], *, model: str = "ubc", version: str = "0",
              headers: Sequence[InstanceHeader] = ()) -> Path:
    """Write ``mask`` [I, J, K] (on the series' stored grid: column ``i``, row ``j``, frame
    ``k`` along the slice normal, non-zero = lesion) as a DICOM SEG at ``path`` (atomic).

    ``sources[k]`` is the (instance file, frame index) of the series' ``k``-th frame, as
    ``ubc.io.dicom.load_series`` returns them; ``headers``: the source instances' headers
    where discovery read them (``read_header``; the others are read here). Returns ``path``.
    """
    files, _ = _source_frames(sources)
    if mask.ndim != 3 or mask.shape[2] != len(sources):
        raise ValueError(f"mask shape {mask.shape} does not match {len(sources)} frames")
    source, frames_of = _read_sources(files, {h.path: h for h in headers})
    if sum(len(frames) for frames in frames_of.values()) != len(sources):
        raise ValueError("the mask does not cover every frame of the source instances")
    if mask.shape[:2] != (source.Columns, source.Rows):
        raise ValueError(f"mask shape {mask.shape} does not match the source's "
                         f"{source.Columns} x {source.Rows} frames")
    frames = [frames_of[file][index] for file, index in sources]  # mask slice k's
    if len({(f.series_uid, f.orientation) for f in frames}) > 1:
        raise ValueError("the source frames are not one series with one orientation")
    normal = _normal(frames[0].orientation)
    positions = np.array([f.position for f in frames])
    order = _seg_order(positions, normal)
    instances = [frames_of[file][0] for file in files]
    sop_uids = [f.sop_uid for f in instances]
    seg = _seg_attributes(
        source, uids=[_seg_uid(sop_uids, version, what)
                      for what in ("series", "instance", "dimension organization")],
        name=model[:64] or "ubc", version=version[:64] or "0",
        description=f"Predicted lesion ({model[:40]})", frames=len(frames),
        spacing=_regular_spacing(positions, normal, by_distance=True),
        three_d=len(frames) > 1
        and _regular_spacing(positions, normal, by_distance=False) is not None)
    references = [_reference(f.sop_class, f.sop_uid) for f in instances]
    encoded = {
        0x00081115: _sequence(0x00081115, [  # ReferencedSeriesSequence
            _sequence(0x0008114A, references) + _text(0x0020000E, b"UI", frames[0].series_uid)]),
        0x00082112: _sequence(0x00082112, references),  # SourceImageSequence
        0x52009230: _sequence(0x52009230, (  # PerFrameFunctionalGroupsSequence
            _frame_groups(frames[k], n) for n, k in enumerate(order, 1))),
        0x7FE00010: _element(0x7FE00010, b"OB", _pixel_data(mask, order))}
    return atomic_write(path, lambda tmp: _write(tmp, seg, encoded))


def read_seg(path: str | os.PathLike[str], sources: Sequence[tuple[Path, int]]) -> np.ndarray:
    """The lesion mask of a SEG written by ``write_seg``, uint8 [I, J, K] on the grid of
    ``sources`` (the inverse of ``write_seg``; used by tests and round-trip checks)."""
    import highdicom as hd
    import pydicom

    files, multiframe = _source_frames(sources)
    seg = hd.seg.segread(path)
    if multiframe:
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
        numbers = [frame + 1 for _, frame in sources]
        stack = seg.get_pixels_by_source_frame(uid, numbers, combine_segments=True)
    else:
        uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f, _ in sources]
        stack = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    return np.ascontiguousarray(np.asarray(stack, dtype=np.uint8).transpose(2, 1, 0))
