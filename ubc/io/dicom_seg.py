"""DICOM out: the predicted lesion mask as a DICOM Segmentation (highdicom) that PACS viewers
overlay on the source series.

- Binary segmentation, one segment ``lesion``: property category SNOMED CT 49755003
  "Morphologically abnormal structure", type SNOMED CT 52988006 "Lesion", anatomic region
  SNOMED CT 12738006 "Brain"; algorithm type AUTOMATIC, named by the bundle.
- It references every source instance (and frame), so viewers align it without resampling:
  the mask is written on the source's own grid (columns, rows, frames), frame ``n`` of the
  SEG covering source frame ``n``, in source order.
- Empty frames are kept (``omit_empty_frames=False``): one SEG frame per source frame, so a
  reader maps frames one to one, and a study with no predicted lesion still gets a valid,
  all-zero SEG. The cost is rows x columns / 8 bytes per empty frame (7 kB at 240 x 240).
- The grade is not written as DICOM: it stays in the results row (JSON lines, CSV or
  Parquet). A structured report (TID 1500) would need coded concepts for "P(HGG)" that no
  standard terminology has, PACS rarely display SR content, and the row already carries the
  study and series UIDs that join it to the SEG. The SEG's ContentDescription names the model.
- No identifying attribute is added; patient and study attributes are copied from the source
  by highdicom, as the standard requires for the SEG to join the study.
- Its series and instance UIDs derive from the source instances and the model's version (a
  hash, under pydicom's UID root): the same series scored by the same model again gives the
  same SEG, so a SEG sent twice (a node killed between sending it and writing its row) is
  one instance in the PACS.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ubc.atomic import atomic_write
from ubc.errors import UBCInputError

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


def _seg_uid(sources: Sequence[pydicom.Dataset], version: str, what: str) -> str:
    """The SEG's series or instance UID, derived from the source instances and the model:
    scoring the same series with the same model again (a run killed after it sent the SEG,
    before its row was written) makes the same SEG, which a PACS keeps once."""
    from pydicom.uid import generate_uid

    uids = sorted(str(ds.SOPInstanceUID) for ds in sources)
    return str(generate_uid(entropy_srcs=["ubc-seg", what, version, *uids]))


def write_seg(mask: np.ndarray, sources: Sequence[tuple[Path, int]],
              path: str | os.PathLike[str], *, model: str = "ubc", version: str = "0") -> Path:
    """Write ``mask`` [I, J, K] (on the series' stored grid: column ``i``, row ``j``, frame
    ``k`` along the slice normal, non-zero = lesion) as a DICOM SEG at ``path`` (atomic).

    ``sources[k]`` is the (instance file, frame index) of the series' ``k``-th frame, as
    ``ubc.io.dicom.load_series`` returns them. Returns ``path``.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    files, multiframe = _source_frames(sources)
    if mask.ndim != 3 or mask.shape[2] != len(sources):
        raise ValueError(f"mask shape {mask.shape} does not match {len(sources)} frames")
    try:
        datasets = [_source_header(pydicom.dcmread(f, stop_before_pixels=True), f)
                    for f in files]
    except UBCInputError:
        raise
    except Exception as exc:
        raise UBCInputError(f"{files[0].parent}: cannot re-read the source series for the "
                            f"SEG ({type(exc).__name__}: {exc})") from exc
    frames = np.ascontiguousarray((mask != 0).transpose(2, 1, 0), dtype=np.uint8)  # [K, J, I]
    if multiframe:  # SEG frame n covers source frame n: undo the sort along the normal
        ordered = np.zeros_like(frames)
        ordered[[frame for _, frame in sources]] = frames
        frames = ordered
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=model[:64] or "ubc", version=version[:64] or "0",
            family=codes.DCM.ArtificialIntelligence),
        anatomic_regions=[codes.SCT.Brain])
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=_seg_uid(datasets, version, "series"), series_number=SERIES_NUMBER,
        sop_instance_uid=_seg_uid(datasets, version, "instance"),
        instance_number=1,
        manufacturer="UBC", manufacturer_model_name=model[:64] or "ubc",
        software_versions=version[:64] or "0", device_serial_number="0",
        series_description="UBC lesion", content_label="LESION",
        content_description=f"Predicted lesion ({model[:40]})",
        omit_empty_frames=False)
    return atomic_write(path, seg.save_as)


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
