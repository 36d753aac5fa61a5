"""Find the cases of an archive: a folder tree (BraTS layout recognised; DICOM studies
recognised by content), a ``.zip`` of either, a text file with one path per line, a CSV
manifest ``case_id,image[,mask,...]``, or a single NIfTI, NRRD or DICOM file. A single file
is taken by its content (``ubc.io.sniff``), whatever its name (one named like a volume
whose content is none of these is a case whose row says what is wrong); text is a path list
only when every line names an existing file or a volume file. Files of a folder whose names
look like volumes but do not match the pattern are not cases: ``discover_archive`` lists
them (``Skipped``).

One ``Case`` model and one discovery for training and scoring (``ubc.data`` reads these).

Case ids:
- BraTS layout (``<case>/<case>_flair.nii.gz``): the case folder's name; the sibling
  ``<case>_seg.nii.gz``, when present, is recorded as the case's mask.
- otherwise: the file's path relative to the archive root (for a list: to the listed files'
  common folder), without the ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr`` extension.
- a manifest: its ``case_id`` column.
- a DICOM study (``ubc.io.dicom_select``: one case per study, its FLAIR series chosen from
  headers only): ``case_id="study"`` (default) its StudyInstanceUID, ``"patient"`` its
  PatientID + StudyDate (identifying: only when asked for), ``"folder"`` the study's folder
  relative to the archive root. A DICOM file whose header cannot be read is a case of its
  own (its relative path), scored as an error row.
Grades (training and evaluation only; scoring ignores them): a ``HGG``/``LGG`` folder above
the file (BraTS 2019), a grade CSV (``labels=``, or ``labels.csv`` / ``name_mapping.csv`` in
the archive root: a ``grade`` column and any case-id columns), or a manifest's ``label``.
Output files derived from a case id go through ``safe_name``, which can never leave the
output folder whatever the id holds (``../../etc/x`` included).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ubc.errors import UBCInputError
from ubc.io.readers import (
    DicomSeries,
    VolumeReader,
    reader_for_content,
    reader_for_file,
    volume_suffix,
)
from ubc.io.sniff import DICOM, NIFTI, NRRD, ZIP, file_kind

if TYPE_CHECKING:
    from ubc.io.dicom_select import DicomStudy, SeriesSelector

__all__ = ["DEFAULT_PATTERN", "GRADES", "CASE_ID_MODES", "Case", "Skipped", "Discovery",
           "ArchiveSource",
           "case_id_for", "discover_cases", "discover_archive", "describe_skipped",
           "parse_grade", "safe_name", "safe_path"]

#: FLAIR-like file names (BraTS 2019 ``_flair``, BraTS 2023 ``-t2f``, TCGA ``_fla_``) of
#: NIfTI and NRRD files; ``|`` separates alternatives. Matched case-insensitively against
#: the file name (or, when the pattern holds a ``/``, against the path relative to the
#: archive root).
DEFAULT_PATTERN = "*flair*.nii*|*t2f*.nii*|*_fla_*.nii*|*flair*.nrrd|*flair*.nhdr"
_BRATS_NAMES = (("_flair", "_seg"), ("-t2f", "-seg"))  # (image, mask) suffixes per edition
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
GRADES = ("LGG", "HGG")  # class index 0, 1 (the bundle's class_names)
_LABEL_CSVS = ("labels.csv", "name_mapping.csv")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_NAME = 120
CASE_ID_MODES = ("study", "patient", "folder")  # the id of a DICOM study
_NOT_MATCHING = "name not matching --pattern"


@dataclass(frozen=True)
class Case:
    """One volume: its id, its image file and, when known, its lesion mask file and its
    grade (0 = LGG, 1 = HGG, None = unknown). ``reader`` reads it (``ubc.io.readers``; by
    default the reader of ``image``'s file name). A DICOM study's ``image`` is its folder;
    its reader (``DicomSeries``) holds the study, its series and the one chosen."""

    case_id: str
    image: Path
    mask: Path | None = None
    label: int | None = None
    reader: VolumeReader = None  # type: ignore[assignment]  # set from image when None

    def __post_init__(self) -> None:
        if self.reader is None:
            object.__setattr__(self, "reader", reader_for_file(self.image))


@dataclass(frozen=True)
class Skipped:
    """A file that looks like an input but is not a case of the archive, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Discovery:
    """The cases of an archive and the files passed over (``Skipped``)."""

    cases: list[Case]
    skipped: list[Skipped]


@runtime_checkable
class ArchiveSource(Protocol):
    """An archive that is not a path: a PACS (``ubc.net``). It finds its cases (their
    readers fetch the volumes), frees what a case held (its spooled files) once the case's
    row is written, and what the run held at the end."""

    def discover(self, *, pattern: str | None, limit: int | None,
                 series_select: SeriesSelector | None, case_id: str) -> Discovery:
        ...

    def release(self, case_id: str) -> None:
        ...

    def close(self) -> None:
        ...


def describe_skipped(skipped: Sequence[Skipped], shown: int = 3) -> str:
    """``2 files not taken (name not matching --pattern): a.nii.gz, b.nrrd``, one such
    part per reason with the first ``shown`` names; "" when none."""
    by_reason: dict[str, list[str]] = {}
    for item in skipped:
        by_reason.setdefault(item.reason, []).append(item.path.name)
    return "; ".join(
        f"{len(names)} file{'s' if len(names) > 1 else ''} not taken ({reason}): "
        + ", ".join(names[:shown]) + (" ..." if len(names) > shown else "")
        for reason, names in by_reason.items())


def parse_grade(value: str, where: str) -> int | None:
    """``LGG``/``0`` -> 0, ``HGG``/``GBM``/``1`` -> 1, empty or unknown -> None;
    UBCInputError naming ``where`` for anything else."""
    text = value.strip().upper()
    if text in ("", "NA", "NAN", "NONE", "UNKNOWN", "?"):
        return None
    if text in ("LGG", "0"):
        return 0
    if text in ("HGG", "GBM", "1"):
        return 1
    raise UBCInputError(f"{where}: grade {value!r} is neither LGG/0 nor HGG/1 (or empty)")


def strip_volume_suffix(name: str) -> str:
    """``a/b_flair.nii.gz`` -> ``a/b_flair`` (also ``.nii``, ``.nrrd``, ``.nhdr``); other
    names are unchanged."""
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def safe_name(case_id: str) -> str:
    """A file-name stem for ``case_id`` that stays inside any folder it is joined to.

    Characters outside ``[A-Za-z0-9._-]`` (path separators included) become ``_``, leading
    and trailing dots/underscores are dropped (no ``..``, no hidden files); when the id had
    to change, a short hash of the original id is appended so that two ids never share a name.
    """
    cleaned = _UNSAFE.sub("_", case_id).strip("._")[:_MAX_NAME]
    if cleaned == case_id and cleaned:
        return cleaned
    digest = hashlib.sha1(case_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned}-{digest}" if cleaned else f"case-{digest}"


def safe_path(folder: str | os.PathLike[str], case_id: str, suffix: str) -> Path:
    """``folder/<safe_name(case_id)><suffix>``, checked to lie directly inside ``folder``."""
    root = Path(folder).resolve()
    path = root / f"{safe_name(case_id)}{suffix}"
    if path.parent != root:  # cannot happen with safe_name; a guard against future edits
        raise ValueError(f"case id {case_id!r} would write outside {root}")
    return path


def _matches(relative: str, pattern: str) -> bool:
    for alternative in pattern.split("|"):
        target = relative if "/" in alternative else relative.rsplit("/", 1)[-1]
        if fnmatch.fnmatchcase(target.lower(), alternative.lower()):
            return True
    return False


def _brats_case(path: Path) -> tuple[str, Path | None] | None:
    """``(case, seg path)`` when ``path`` is ``<case>/<case>_flair.nii[.gz]`` (BraTS 2019)
    or ``<case>/<case>-t2f.nii[.gz]`` (BraTS 2023), else None."""
    stem = strip_volume_suffix(path.name).lower()
    folder = path.parent.name
    for image, mask in _BRATS_NAMES:
        if folder and stem == f"{folder}{image}".lower():
            segs = [path.parent / f"{folder}{mask}{suffix}" for suffix in _NIFTI_SUFFIXES]
            return folder, next((seg for seg in segs if seg.is_file()), None)
    return None


def case_id_for(path: str | os.PathLike[str]) -> str:
    """The id of a lone file: its BraTS case folder's name, else its name without extension."""
    path = Path(path)
    brats = _brats_case(path)
    return brats[0] if brats else strip_volume_suffix(path.name)


def _folder_grade(relative: str) -> int | None:
    """The grade of a BraTS 2019 path ``HGG/<case>/...`` (any HGG/LGG folder above it)."""
    folders = [part.upper() for part in relative.split("/")[:-1]]
    hits = [GRADES.index(f) for f in folders if f in GRADES]
    return hits[-1] if hits else None


def _cases_from_files(files: Iterable[Path], root: Path,
                      grades: dict[str, int | None] | None = None) -> list[Case]:
    """Cases for image files under ``root``; BraTS ids where unique, relative paths else.
    Grades come from ``grades`` (case id -> grade) or else from an HGG/LGG folder."""
    entries = []
    for path in files:
        relative = strip_volume_suffix(path.relative_to(root).as_posix())
        brats = _brats_case(path)
        entries.append((brats[0] if brats else relative, relative, path,
                        brats[1] if brats else None))
    seen = Counter(case_id for case_id, *_ in entries)
    cases = []
    for case_id, relative, path, mask in entries:
        label = grades.get(case_id) if grades else _folder_grade(relative)
        cases.append(Case(case_id if seen[case_id] == 1 else relative, path, mask, label))
    return cases


def _read_grades(path: Path) -> dict[str, int | None]:
    """case id -> grade from a CSV with a ``grade`` column and any case-id column(s)."""
    rows = list(csv.DictReader(_read_text(path).splitlines()))
    if not rows or not any((k or "").strip().lower() == "grade" for k in rows[0]):
        raise UBCInputError(f"{path}: needs a 'grade' column (HGG/LGG) and a case id column")
    grade_key = next(k for k in rows[0] if (k or "").strip().lower() == "grade")
    grades: dict[str, int | None] = {}
    for n, row in enumerate(rows, start=2):
        grade = parse_grade(row[grade_key] or "", f"{path} line {n}")
        for key, value in row.items():  # name_mapping.csv has one id column per BraTS year
            if key != grade_key and value:
                grades[value.strip()] = grade
    return grades


def _grades_for(root: Path, labels: Path | None) -> dict[str, int | None] | None:
    if labels is None:
        labels = next((root / n for n in _LABEL_CSVS if (root / n).is_file()), None)
    return _read_grades(labels) if labels is not None else None


def _walk(root: Path, pattern: str) -> tuple[list[Path], list[Skipped]]:
    """The volume files under ``root`` that match ``pattern``, and those that do not."""
    found, skipped = [], []
    for folder, dirs, names in os.walk(root):  # followlinks=False: no symlink loops
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or volume_suffix(name) is None:
                continue
            path = Path(folder) / name
            if _matches(path.relative_to(root).as_posix(), pattern):
                found.append(path)
            else:
                skipped.append(Skipped(path, _NOT_MATCHING))
    return found, skipped


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UBCInputError(f"{path}: cannot read the case list ({exc})") from exc


def _listed_files(path: Path, text: str) -> list[Path]:
    """The files of a path list: every line (blank lines and ``#`` comments aside) names an
    existing path or a volume file; ``UBCInputError`` naming the first line that does not
    (then ``path`` is no input at all)."""
    files = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        file = Path(os.path.abspath(path.parent / line))  # an absolute line stays as is
        if not file.exists() and volume_suffix(line) is None:
            raise UBCInputError(
                f"{path}: not an input: its content is not {NIFTI}, {NRRD}, {DICOM} or "
                f"{ZIP}, and as a list of paths its line {number} ({line[:60]!r}) is neither "
                "an existing file nor a .nii/.nii.gz/.nrrd/.nhdr name")
        files.append(file)
    return files


def _from_list(files: list[Path]) -> list[Case]:
    if not files:
        return []
    root = Path(os.path.commonpath([f.parent for f in files]))
    return _cases_from_files(files, root)


def _from_manifest(path: Path, text: str) -> list[Case]:
    reader = csv.DictReader(text.splitlines())
    fields = [f.strip() for f in reader.fieldnames or []]
    if "case_id" not in fields or "image" not in fields:
        raise UBCInputError(f"{path}: a manifest needs the columns case_id,image "
                            f"(found: {', '.join(fields) or 'no header'})")
    cases = []
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row["case_id"] or not row["image"]:
            raise UBCInputError(f"{path}:{line}: empty case_id or image")
        image, mask = Path(row["image"]), Path(row["mask"]) if row.get("mask") else None
        cases.append(Case(row["case_id"], path.parent / image,  # an absolute path stays as is
                          None if mask is None else path.parent / mask,
                          parse_grade(row.get("label", ""), f"{path} line {line}")))
    return cases


def _is_manifest(path: Path, text: str) -> bool:
    if path.suffix.lower() == ".csv":
        return True
    header = text.split("\n", 1)[0]
    return {"case_id", "image"} <= {h.strip() for h in header.split(",")}


def _from_file(path: Path, kind: str | None, selector: SeriesSelector | None,
               case_id: str) -> list[Case]:
    """The cases of a single file of content ``kind`` (``file_kind``): a volume, a DICOM
    instance, a CSV manifest or a path list; ``UBCInputError`` for anything else."""
    if kind == DICOM:
        return _dicom_cases(path.parent, [path], selector, case_id)
    reader = reader_for_content(path, kind)
    if reader is not None:
        return [Case(case_id_for(path), path, reader=reader)]
    if volume_suffix(path.name) is not None:  # its loader says what is wrong, in its row
        return [Case(case_id_for(path), path)]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UBCInputError(f"{path}: not an input: its content is not {NIFTI}, {NRRD}, "
                            f"{DICOM} or {ZIP}, nor text (a list of paths or a CSV "
                            "manifest)") from None
    except OSError as exc:
        raise UBCInputError(f"{path}: cannot read ({exc})") from exc
    if _is_manifest(path, text):
        return _from_manifest(path, text)
    return _from_list(_listed_files(path, text))


def _dicom_case_id(study: DicomStudy, root: Path, mode: str) -> str:
    if mode == "patient":
        return study.patient_key
    if mode == "folder":
        relative = study.folder.relative_to(root).as_posix() if study.folder != root else ""
        return relative if relative not in ("", ".") else root.name
    return study.study_uid


def _dicom_cases(root: Path, files: list[Path], selector: SeriesSelector | None,
                 case_id: str) -> list[Case]:
    """One case per DICOM study under ``root`` (headers only), plus one per file whose
    header cannot be read (scored as an error row naming the file)."""
    from ubc.io.dicom_select import DicomStudy, scan_studies

    studies, unreadable = scan_studies(root, selector, files=files)
    cases = [Case(_dicom_case_id(study, root, case_id), study.folder,
                  reader=DicomSeries(study)) for study in studies]
    for path, error in unreadable:
        broken = DicomStudy("", path.parent, (), None, (), error, "")
        cases.append(Case(path.relative_to(root).as_posix(), path,
                          reader=DicomSeries(broken)))
    return cases


def _has_dicom(root: Path) -> list[Path]:
    """The DICOM files under ``root``; [] without the ``[dicom]`` extra when there are none,
    ``UBCInputError`` naming the extra when there are some and pydicom is missing."""
    import importlib.util

    from ubc.io.dicom import find_dicom_files

    found = find_dicom_files(root)
    if found and importlib.util.find_spec("pydicom") is None:
        raise UBCInputError(f"{root}: holds DICOM files ({found[0]}, ...); reading them needs "
                            "the dicom extra: pip install ubc[dicom]")
    return found


def _check_unique(cases: list[Case], source: Path) -> None:
    counts = Counter(c.case_id for c in cases)
    duplicates = sorted(case_id for case_id, n in counts.items() if n > 1)
    if duplicates:
        raise UBCInputError(f"{source}: duplicate case ids: {', '.join(duplicates[:5])}"
                            + (" ..." if len(duplicates) > 5 else ""))


def discover_cases(source: str | os.PathLike[str] | ArchiveSource, *,
                   pattern: str | None = None, limit: int | None = None,
                   labels: str | os.PathLike[str] | None = None,
                   series_select: str | SeriesSelector | None = None,
                   case_id: str = "study") -> list[Case]:
    """The cases of ``source`` (``discover_archive`` without the files passed over)."""
    return discover_archive(source, pattern=pattern, limit=limit, labels=labels,
                            series_select=series_select, case_id=case_id).cases


def discover_archive(source: str | os.PathLike[str] | ArchiveSource, *,
                     pattern: str | None = None,
                     limit: int | None = None, labels: str | os.PathLike[str] | None = None,
                     series_select: str | SeriesSelector | None = None,
                     case_id: str = "study") -> Discovery:
    """The cases of ``source``, in a stable order (sorted paths, or the list's own order),
    and the volume files of a folder that are not cases (their names do not match).

    ``pattern`` (default ``DEFAULT_PATTERN``) selects image files in a folder tree; files of
    a list or manifest are taken as given (a missing one becomes an error row when scored).
    ``labels``: a grade CSV for a folder tree (see the module docstring). DICOM files in a
    folder (or a ``.zip``) are grouped into studies: ``series_select`` overrides the FLAIR
    rules (``ubc.io.dicom_select``), ``case_id`` (``CASE_ID_MODES``) names the studies.
    An ``ArchiveSource`` (a PACS) finds its own cases.
    Raises ``UBCInputError`` when ``source`` is missing, unreadable or of no input kind, or
    ids repeat.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if case_id not in CASE_ID_MODES:
        raise ValueError(f"case_id must be one of {CASE_ID_MODES}, got {case_id!r}")
    if isinstance(series_select, str):
        from ubc.io.dicom_select import SeriesSelector

        series_select = SeriesSelector.parse(series_select)
    if isinstance(source, ArchiveSource):
        return source.discover(pattern=pattern, limit=limit, series_select=series_select,
                               case_id=case_id)
    path = Path(source)
    kind = _file_kind(path) if path.is_file() else None
    if kind == ZIP or (path.is_file() and path.suffix.lower() == ".zip"):
        from ubc.scoring.archive_zip import extract_zip

        path = extract_zip(path)
    skipped: list[Skipped] = []
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise UBCInputError(f"{path}: folder not readable (permission denied)")
        grades = _grades_for(path, Path(labels) if labels else None)
        files, skipped = _walk(path, pattern or DEFAULT_PATTERN)
        cases = _cases_from_files(files, path, grades)
        masks = {case.mask for case in cases}
        skipped = [item for item in skipped if item.path not in masks]  # taken, as masks
        dicom_files = _has_dicom(path)
        if dicom_files:
            cases += [dataclasses.replace(c, label=grades.get(c.case_id) if grades else None)
                      for c in _dicom_cases(path, dicom_files, series_select, case_id)]
    elif path.is_file():
        cases = _from_file(path, kind, series_select, case_id)
    else:
        raise UBCInputError(f"{path}: no such file or folder (not a folder of NIfTI, NRRD or "
                            "DICOM files, a .zip of one, a text file with one path per line, "
                            "or a CSV manifest)")
    _check_unique(cases, path)
    return Discovery(cases if limit is None else cases[:limit], skipped)


def _file_kind(path: Path) -> str | None:
    try:
        return file_kind(path)
    except OSError as exc:
        raise UBCInputError(f"{path}: cannot read ({exc})") from exc
