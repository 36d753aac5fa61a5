"""Which series of a DICOM study is the FLAIR: studies and series from instance headers, the
default selection rules, the ``--series-select`` override and the tie-break.

Default rules (``FLAIR_RULES``): a series is a FLAIR candidate when it is MR, has at least
``MIN_FRAMES`` frames (localizers have 1-3), is not named like a T1, localizer, scout,
survey or pilot (``_NOT_FLAIR`` on SeriesDescription/ProtocolName), and either
- SeriesDescription or ProtocolName matches ``_FLAIR_NAME`` (FLAIR, dark-fluid, TIRM,
  T2F/T2-FLAIR, FLA), or SequenceName matches ``_FLAIR_SEQUENCE`` (Siemens ``*tir2d``,
  ``*spcir``: turbo/SPACE inversion recovery), or
- ScanningSequence holds ``IR`` with InversionTime >= ``MIN_FLAIR_TI_MS`` (FLAIR nulls CSF
  with TI 1,800-2,800 ms; STIR uses ~150 ms and T1-FLAIR ~800-1,000 ms) and, when known,
  EchoTime >= ``MIN_FLAIR_TE_MS`` (T2 weighting).
Tie-break among several candidates, in this order: ORIGINAL before DERIVED images, axial
before other planes, most frames, highest SeriesNumber (the latest repeat), SeriesInstanceUID.
The row's ``flags`` say how many candidates there were and what decided.

Override (``SeriesSelector.parse``): a regular expression searched (case-insensitive) in
SeriesDescription, e.g. ``'ax.*flair'``; or rules on header attributes joined by ``;``, all
of which must hold, e.g. ``'SeriesDescription=flair;InversionTime>=1800'``: ``=`` is a
regular expression search, ``>=``, ``<=``, ``>``, ``<`` compare numbers. Keywords: those of
``SELECTOR_KEYWORDS``. MR only; the same tie-break applies.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ubc.errors import UBCInputError
from ubc.io.dicom import InstanceHeader, find_dicom_files, read_header

__all__ = ["MIN_FRAMES", "MIN_FLAIR_TI_MS", "MIN_FLAIR_TE_MS", "SELECTOR_KEYWORDS",
           "SeriesInfo", "DicomStudy", "SeriesSelector", "scan_studies", "select_series",
           "study_from_headers"]

MIN_FRAMES = 8
MIN_FLAIR_TI_MS = 1500.0
MIN_FLAIR_TE_MS = 50.0
_FLAIR_NAME = re.compile(r"flair|dark[\s_-]*fluid|tirm|(^|[^a-z0-9])t2[\s_-]*f($|[^a-z0-9])"
                         r"|(^|[^a-z])fla($|[^a-z])", re.IGNORECASE)
_FLAIR_SEQUENCE = re.compile(r"tir[23]d|spcir", re.IGNORECASE)
_NOT_FLAIR = re.compile(r"(^|[^a-z0-9])t1|locali[sz]er|scout|survey|pilot", re.IGNORECASE)
#: selector keyword -> SeriesInfo attribute
SELECTOR_KEYWORDS = {
    "SeriesDescription": "description", "ProtocolName": "protocol",
    "SequenceName": "sequence_name", "ScanningSequence": "scanning_sequence",
    "InversionTime": "inversion_time_ms", "EchoTime": "echo_time_ms",
    "ImageType": "image_type", "SeriesNumber": "series_number", "Modality": "modality",
}
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_RULE = re.compile(r"^\s*([A-Za-z]+)\s*(>=|<=|=|>|<)\s*(.*?)\s*$")


@dataclass(frozen=True)
class SeriesInfo:
    """One series of a study, from its instances' headers. ``plane``: axial, coronal or
    sagittal by the slice normal's largest component (``unknown`` without orientation)."""

    series_uid: str
    description: str
    protocol: str
    sequence_name: str
    scanning_sequence: str
    inversion_time_ms: float | None
    echo_time_ms: float | None
    image_type: str
    series_number: int | None
    modality: str
    plane: str
    frames: int
    files: tuple[Path, ...]
    #: the headers discovery read (``load_series`` does not parse those files again)
    headers: tuple[InstanceHeader, ...] = field(default=(), compare=False, repr=False)

    def summary(self) -> str:
        """``#3 'AX T2 FLAIR' MR axial 24 frames`` (no identifying attributes)."""
        number = "?" if self.series_number is None else self.series_number
        return f"#{number} {self.description!r} {self.modality} {self.plane} {self.frames} " \
               "frames"


@dataclass(frozen=True)
class DicomStudy:
    """A study found in an archive and the series chosen for scoring (``chosen`` None and
    ``error`` set when no series qualifies). ``flags``: how the choice was made.
    ``patient_key``: PatientID + StudyDate, used only for ``--case-id patient``."""

    study_uid: str
    folder: Path
    series: tuple[SeriesInfo, ...]
    chosen: SeriesInfo | None
    flags: tuple[str, ...]
    error: str | None
    patient_key: str
    other_files: tuple[Path, ...] = ()  # non-image objects and repeated instances

    def without_headers(self) -> DicomStudy:
        """The study without the instance headers discovery read (once its series is loaded
        they are about 100 kB per study for nothing: what crosses a Ray cluster)."""
        if self.chosen is None:
            return self
        chosen = dataclasses.replace(self.chosen, headers=())
        return dataclasses.replace(self, chosen=chosen, series=tuple(
            chosen if s is self.chosen else s for s in self.series))

    @property
    def files(self) -> tuple[Path, ...]:
        """Every instance file of the study (its resume identity)."""
        return tuple(sorted([*(f for s in self.series for f in s.files), *self.other_files]))


@dataclass(frozen=True)
class SeriesSelector:
    """A user's series choice (see the module docstring). ``rules``: (attribute, operator,
    value) triples; the text as given is kept for messages."""

    text: str
    rules: tuple[tuple[str, str, str], ...]

    @classmethod
    def parse(cls, text: str) -> SeriesSelector:
        """``'regex'`` or ``'Keyword=regex;Keyword>=number'``; ValueError when malformed."""
        parts = [p for p in text.split(";") if p.strip()]
        if not parts:
            raise ValueError("--series-select is empty")
        matches = [_RULE.match(p) for p in parts]
        if not any(m and m.group(1)[:1].isupper() for m in matches):
            _compiled(text)
            return cls(text, (("description", "=", text),))
        rules = []
        for part, m in zip(parts, matches, strict=True):
            if m is None or m.group(1) not in SELECTOR_KEYWORDS:
                raise ValueError(f"--series-select: {part!r} is not a rule; rules are "
                                 "Keyword=regex or Keyword>=number joined by ';', keywords: "
                                 f"{', '.join(SELECTOR_KEYWORDS)}")
            keyword, op, value = m.groups()
            if op in _COMPARE:
                try:
                    float(value)
                except ValueError:
                    raise ValueError(f"--series-select: {keyword}{op}{value!r} needs a "
                                     "number") from None
            else:
                _compiled(value)
            rules.append((SELECTOR_KEYWORDS[keyword], op, value))
        return cls(text, tuple(rules))

    def matches(self, series: SeriesInfo) -> bool:
        for attribute, op, value in self.rules:
            actual = getattr(series, attribute)
            if op == "=":
                if not re.search(value, "" if actual is None else str(actual), re.IGNORECASE):
                    return False
            elif actual is None or not _COMPARE[op](float(actual), float(value)):
                return False
        return True


def _compiled(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"--series-select: bad regular expression {pattern!r} ({exc})") \
            from None


def _plane(normal: tuple[float, float, float] | None) -> str:
    if normal is None:
        return "unknown"
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def _is_flair(series: SeriesInfo) -> str | None:
    """The default rule that makes ``series`` a FLAIR candidate, or None."""
    return _flair_rule(series) if series.frames >= MIN_FRAMES else None


def _flair_rule(series: SeriesInfo) -> str | None:
    """The default rule by which ``series`` looks like a FLAIR, whatever its frames."""
    if series.modality != "MR":
        return None
    names = f"{series.description} {series.protocol}"
    if _NOT_FLAIR.search(names):
        return None
    if _FLAIR_NAME.search(names):
        return "name"
    if _FLAIR_SEQUENCE.search(series.sequence_name):
        return "sequence name"
    ti, te = series.inversion_time_ms, series.echo_time_ms
    if "IR" in series.scanning_sequence.upper().split("\\") and ti is not None \
            and ti >= MIN_FLAIR_TI_MS and (te is None or te >= MIN_FLAIR_TE_MS):
        return f"IR TI {ti:g} ms"
    return None


def _tie_break(series: SeriesInfo) -> tuple[int, int, int, int, str]:
    derived = 0 if series.image_type.upper().startswith("ORIGINAL") else 1
    return (derived, 0 if series.plane == "axial" else 1, -series.frames,
            -(series.series_number if series.series_number is not None else -1),
            series.series_uid)


def _no_candidate(series: list[SeriesInfo], selector: SeriesSelector | None) -> str:
    """Why no series of a study qualifies (a FLAIR of too few frames: a lone slice)."""
    short = [s for s in series if selector is None and _flair_rule(s) is not None]
    if short:
        return f"the FLAIR series {short[0].summary()} has too few frames for a volume " \
               f"(at least {MIN_FRAMES}): give the whole series, not single slices"
    seen = "; ".join(s.summary() for s in sorted(series, key=_tie_break)) or "none"
    how = f"matches --series-select {selector.text!r}" if selector else \
        "looks like a FLAIR (see ubc.io.dicom_select)"
    return f"no MR series {how}; series seen: {seen}; choose one with --series-select"


def select_series(series: Iterable[SeriesInfo], selector: SeriesSelector | None = None
                  ) -> tuple[SeriesInfo | None, tuple[str, ...], str | None]:
    """``(chosen, flags, error)`` for one study's series (see the module docstring)."""
    series = list(series)
    if selector is None:
        candidates = [(s, rule) for s in series if (rule := _is_flair(s)) is not None]
    else:
        candidates = [(s, f"--series-select {selector.text}") for s in series
                      if s.modality == "MR" and selector.matches(s)]
    if not candidates:
        return None, (), _no_candidate(series, selector)
    candidates.sort(key=lambda c: _tie_break(c[0]))
    chosen, rule = candidates[0]
    flags = [f"series_rule:{rule}"]
    if len(candidates) > 1:
        flags.append(f"series_tiebreak:{len(candidates)} candidates, chose "
                     f"{chosen.summary()} (original > axial > most frames > latest)")
    return chosen, tuple(flags), None


def _series_of(headers: list[InstanceHeader]) -> SeriesInfo:
    first = headers[0]
    return SeriesInfo(
        series_uid=first.series_uid, description=first.description, protocol=first.protocol,
        sequence_name=first.sequence_name, scanning_sequence=first.scanning_sequence,
        inversion_time_ms=first.inversion_time_ms, echo_time_ms=first.echo_time_ms,
        image_type=first.image_type, series_number=first.series_number,
        modality="/".join(sorted({h.modality or "?" for h in headers})),
        plane=_plane(first.normal), frames=sum(h.frames for h in headers),
        files=tuple(sorted(h.path for h in headers)), headers=tuple(headers))


def _unique_instances(headers: list[InstanceHeader]
                      ) -> tuple[list[InstanceHeader], list[InstanceHeader]]:
    """``(unique, repeats)``: files holding an instance (SOPInstanceUID) already seen are
    copies (exports often hold several), not further frames."""
    seen: set[str] = set()
    unique, repeats = [], []
    for header in sorted(headers, key=lambda h: h.path):
        if header.sop_uid and header.sop_uid in seen:
            repeats.append(header)
        else:
            seen.add(header.sop_uid)
            unique.append(header)
    return unique, repeats


def _contents(headers: list[InstanceHeader]) -> str:
    """``2 SR, 1 RTPLAN``: what the objects are, most frequent first."""
    counts = Counter(h.contents for h in headers)
    return ", ".join(f"{n} {what}" for what, n in counts.most_common())


def study_from_headers(study_uid: str, headers: list[InstanceHeader],
                       selector: SeriesSelector | None) -> DicomStudy:
    """One study from its instances' headers (files, or a PACS's metadata): its image
    series and the one chosen."""
    images, repeats = _unique_instances([h for h in headers if h.image])
    others = [h for h in headers if not h.image]
    by_series: dict[str, list[InstanceHeader]] = {}
    for header in images:
        by_series.setdefault(header.series_uid, []).append(header)
    series = tuple(_series_of(h) for h in by_series.values())
    if series:
        chosen, flags, error = select_series(series, selector)
    else:
        chosen, flags, error = None, (), f"no image series: {_contents(others)}"
    # only the chosen series is read: the others' headers would be kept for nothing
    series = tuple(s if s is chosen else dataclasses.replace(s, headers=()) for s in series)
    if repeats:
        flags += (f"duplicate_instances:{len(repeats)} files repeat an instance already read "
                  "(same SOPInstanceUID), ignored",)
    located = images or others
    folder = Path(os.path.commonpath([str(h.path.parent) for h in located]))
    return DicomStudy(study_uid, folder, series, chosen, flags, error,
                      f"{headers[0].patient_id}_{headers[0].study_date}",
                      tuple(h.path for h in [*others, *repeats]))


def scan_studies(root: str | os.PathLike[str], selector: SeriesSelector | None = None,
                 files: Iterable[Path] | None = None
                 ) -> tuple[list[DicomStudy], list[tuple[Path, str]]]:
    """``(studies sorted by their folder then uid, unreadable files with the reason)`` of
    the DICOM files under ``root`` (or ``files``), reading headers only. Every study found
    is one: a study without an image series too (its ``error`` says what it holds)."""
    studies: dict[str, list[InstanceHeader]] = {}
    unreadable = []
    for path in files if files is not None else find_dicom_files(root):
        try:
            header = read_header(path)
        except UBCInputError as exc:
            unreadable.append((path, str(exc)))
            continue
        if header is not None:
            studies.setdefault(header.study_uid, []).append(header)
    found = [study_from_headers(uid, headers, selector) for uid, headers in studies.items()]
    found.sort(key=lambda s: (str(s.folder), s.study_uid))
    return found, unreadable
