"""Where a bundle's training data came from, as ``ubc-train`` recorded it in meta.json
(``training.training_data``): the kind of source, the archive's name, the cases per grade
and the spacing range of the training volumes.

Scoring reads it back: rows carry ``trained_on`` (``TrainingData.describe``), the spacing
check compares inputs with the training volumes (``ubc.io.conformance.TrainedSpacing``), and
``ubc-infer`` / ``ubc-serve`` warn once at start when the model never saw a real scan. A
bundle older than the record has none: ``trained_on`` is ``unknown`` and the spacing check
compares with the model's grid, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ubc.errors import BundleError
from ubc.io.conformance import TrainedSpacing

if TYPE_CHECKING:
    from ubc.bundle import Bundle

__all__ = ["SYNTH_MARKER", "SYNTHETIC", "BRATS", "MANIFEST", "FOLDER", "SOURCES", "UNKNOWN",
           "TrainingData", "trained_on", "synthetic_warning"]

#: the file ``ubc-synth`` writes in the root of every archive it makes (its settings)
SYNTH_MARKER = "ubc-synth.json"
SYNTHETIC, BRATS, MANIFEST, FOLDER = "ubc-synth phantoms", "BraTS layout", "manifest", "folder"
SOURCES = (SYNTHETIC, BRATS, MANIFEST, FOLDER)
UNKNOWN = "unknown"  # trained_on of a bundle that does not record its training data
_WARNING = ("warning: this model was trained on synthetic phantoms (ubc-synth), not on real "
            "scans; its scores on real MRI mean nothing")


@dataclass(frozen=True)
class TrainingData:
    """The record: ``source`` (one of ``SOURCES``), ``root`` (the archive's or manifest's
    name, never a full path), ``cases`` ((grade, count) pairs of the training cases, in the
    order of their names: meta.json is written with sorted keys) and the training volumes'
    ``spacing`` (None when unknown)."""

    source: str
    root: str
    cases: tuple[tuple[str, int], ...]
    spacing: TrainedSpacing | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cases", tuple(sorted(self.cases)))

    @property
    def synthetic(self) -> bool:
        return self.source == SYNTHETIC

    def describe(self) -> str:
        """``ubc-synth phantoms (108 HGG, 108 LGG)``: the rows' ``trained_on``."""
        counts = ", ".join(f"{n} {grade}" for grade, n in self.cases)
        return f"{self.source} ({counts})" if counts else self.source

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "root": self.root,
                               "cases": dict(self.cases)}
        if self.spacing is not None:
            out["spacing_mm"] = {"inplane": list(self.spacing.inplane),
                                 "thickness": list(self.spacing.thickness)}
        return out

    @classmethod
    def from_json(cls, entry: Any) -> TrainingData:
        """The record of meta.json; ``ValueError`` saying what is wrong."""
        if not isinstance(entry, Mapping) or entry.get("source") not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}")
        cases = entry.get("cases") or {}
        if not isinstance(cases, Mapping) or not all(
                isinstance(n, int) and n >= 0 for n in cases.values()):
            raise ValueError("cases must map grades to counts")
        spacing = entry.get("spacing_mm")
        return cls(str(entry["source"]), str(entry.get("root") or ""),
                   tuple((str(g), int(n)) for g, n in cases.items()),
                   None if spacing is None else _spacing(spacing))

    @classmethod
    def of_meta(cls, meta: Mapping[str, Any], where: str = "meta.json") -> TrainingData | None:
        """The record of a bundle's parsed meta.json; None when it has none (an older
        bundle); ``BundleError`` naming ``where`` when it is malformed."""
        training = meta.get("training")
        entry = training.get("training_data") if isinstance(training, Mapping) else None
        if entry is None:
            return None
        try:
            return cls.from_json(entry)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{where}: malformed training.training_data ({exc})") from exc

    @classmethod
    def of_bundle(cls, bundle: Bundle) -> TrainingData | None:
        """``of_meta`` of an opened bundle."""
        from ubc.bundle import META_FILE

        return cls.of_meta(bundle.meta, str(bundle.path / META_FILE))


def _spacing(entry: Any) -> TrainedSpacing:
    def pair(key: str) -> tuple[float, float]:
        low, high = (float(v) for v in entry[key])
        if not 0 < low <= high:
            raise ValueError(f"spacing_mm.{key} must be [min, max] in mm, got {entry[key]}")
        return low, high

    try:
        return TrainedSpacing(inplane=pair("inplane"), thickness=pair("thickness"))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"spacing_mm needs inplane and thickness [min, max] ({exc})") from exc


def trained_on(training: TrainingData | None) -> str:
    """The rows' ``trained_on``: the record's description, ``unknown`` without one."""
    return UNKNOWN if training is None else training.describe()


def synthetic_warning(training: TrainingData | None) -> str | None:
    """The one line ``ubc-infer`` and ``ubc-serve`` print at start for a model trained on
    phantoms; None otherwise."""
    return _WARNING if training is not None and training.synthetic else None
