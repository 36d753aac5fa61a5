"""The model bundle: one directory ``NAME.ubc/`` holding meta.json and every artifact.

meta.json records the sha256 of every file; an artifact whose bytes do not match is refused.
Every field of meta.json that is read is checked when the bundle opens (a bundle that opens
can score), and every artifact carries the settings it was made with, which its engine
compares with meta.json (``artifact_metadata_mismatch``).
Writes are atomic: a file is written beside its final name and renamed into place, and
meta.json is rewritten the same way, so a killed writer leaves the previous bundle usable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from ubc.atomic import atomic_write
from ubc.errors import BundleError

META_FILE = "meta.json"
WEIGHTS_FILE = "weights.pt"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "arch", "preprocessing", "class_names", "top_k", "files")
#: meta.json settings every artifact carries from its export (ONNX ``metadata_props``, the
#: TorchScript extra file, weights.pt's state-dict metadata, OpenVINO ``rt_info``,
#: AOTInductor metadata; a TensorRT plan in its meta.json record), compared with meta.json
#: when it is loaded: a model scores only with the settings it was trained with
EMBEDDED_SETTINGS = ("preprocessing", "class_names")


@dataclass(frozen=True)
class Preprocessing:
    """How slices are made for this model; training and scoring both read it from meta.json."""

    size: tuple[int, int] = (224, 224)
    target_spacing: tuple[float, float] = (1.0, 1.0)
    norm: str = "zscore"

    def to_json(self) -> dict[str, Any]:
        return {"size": list(self.size), "target_spacing": list(self.target_spacing),
                "norm": self.norm}

    @classmethod
    def from_json(cls, entry: object) -> Preprocessing:
        """The ``preprocessing`` entry of meta.json, checked (BundleError naming the field)."""
        if not isinstance(entry, dict):
            raise BundleError(f"preprocessing must be a mapping of size, target_spacing and "
                              f"norm, got {type(entry).__name__}")
        missing = [k for k in ("size", "target_spacing", "norm") if k not in entry]
        if missing:
            raise BundleError(f"preprocessing lacks {', '.join(missing)}")
        return cls(size=_checked_size(entry["size"]),
                   target_spacing=_checked_spacing(entry["target_spacing"]),
                   norm=_checked_norm(entry["norm"]))


#: ``ubc.preprocess.NORMS``, repeated here: the bundle sits below the preprocessing layer
NORMS = ("zscore", "percentile", "none")
#: the U-Net halves a slice five times; larger sizes than this are a typo, not a model
_SIZE_STEP, _MAX_SIZE = 32, 4096


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pair(value: object, field: str, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) != 2:
        raise BundleError(f"{field} must be a list of two {what}, got {value!r}")
    return value


def _checked_size(value: object) -> tuple[int, int]:
    size = _pair(value, "preprocessing.size", "pixel counts [height, width]")
    if not all(_is_int(s) and _SIZE_STEP <= s <= _MAX_SIZE and s % _SIZE_STEP == 0
               for s in size):
        raise BundleError(f"preprocessing.size must be two multiples of {_SIZE_STEP} within "
                          f"{_SIZE_STEP}..{_MAX_SIZE} (the U-Net halves a slice five times), "
                          f"got {value!r}")
    return int(size[0]), int(size[1])


def _checked_spacing(value: object) -> tuple[float, float]:
    spacing = _pair(value, "preprocessing.target_spacing", "millimetres")
    if not all(_is_number(s) and math.isfinite(s) and s > 0 for s in spacing):
        raise BundleError(f"preprocessing.target_spacing must be two positive millimetre "
                          f"values, got {value!r}")
    return float(spacing[0]), float(spacing[1])


def _checked_norm(value: object) -> str:
    if value not in NORMS:
        raise BundleError(f"preprocessing.norm must be one of {', '.join(NORMS)}, "
                          f"got {value!r}")
    return str(value)


def _check_format_version(value: object) -> None:
    if not _is_int(value) or value < 1:
        raise BundleError(f"format_version must be a whole number >= 1, got {value!r}")
    if value > FORMAT_VERSION:
        raise BundleError(f"made by a newer ubc (format_version {value} > {FORMAT_VERSION}); "
                          "upgrade ubc")


def _check_arch(value: object) -> None:
    if not isinstance(value, str) or not value:
        raise BundleError(f"arch must be the architecture's name, got {value!r}")


def _check_class_names(value: object) -> None:
    if not isinstance(value, list) or len(value) != 2 or \
            not all(isinstance(n, str) and n.strip() for n in value) or value[0] == value[1]:
        raise BundleError(f"class_names must be a list of two different names (one per "
                          f"class logit, e.g. [\"LGG\", \"HGG\"]), got {value!r}")


def _check_top_k(value: object) -> None:
    if not _is_int(value) or value < 1:
        raise BundleError(f"top_k must be a whole number >= 1 (slices per case that score "
                          f"it), got {value!r}")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_files(value: object) -> None:
    if not isinstance(value, dict):
        raise BundleError(f"files must be a mapping of file name to sha256, got "
                          f"{type(value).__name__}")
    wrong = sorted(str(name) for name, sha in value.items()
                   if not isinstance(sha, str) or not _SHA256.fullmatch(sha))
    if wrong:
        raise BundleError(f"files must map each file name to its sha256 (64 hex digits); "
                          f"{', '.join(wrong)} do not")
    if WEIGHTS_FILE not in value:
        raise BundleError(f"files has no {WEIGHTS_FILE!r} entry: every bundle records the "
                          "sha256 of its weights")


#: optional meta.json records that are read when present: each must be a mapping
_OPTIONAL_MAPPINGS = ("artifacts", "parity", "timing", "scoring", "training")


def _check_optional_mappings(meta: dict[str, Any]) -> None:
    for key in _OPTIONAL_MAPPINGS:
        if key in meta and not isinstance(meta[key], dict):
            raise BundleError(f"{key} must be a mapping, got {type(meta[key]).__name__}")
    wrong = sorted(str(name) for name, entry in meta.get("artifacts", {}).items()
                   if not isinstance(entry, dict))
    if wrong:
        raise BundleError(f"artifacts must map each file name to its description (a "
                          f"mapping); {', '.join(wrong)} do not")


def checked_meta(meta: object) -> Preprocessing:
    """Check every meta.json field that is read (presence, type, range) and return its
    preprocessing; BundleError naming the field otherwise. A bundle that opens can score."""
    if not isinstance(meta, dict):
        raise BundleError(f"meta.json must be a JSON object, got {type(meta).__name__}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise BundleError(f"malformed meta.json, missing {', '.join(missing)}")
    _check_format_version(meta["format_version"])
    _check_arch(meta["arch"])
    _check_class_names(meta["class_names"])
    _check_top_k(meta["top_k"])
    _check_files(meta["files"])
    _check_optional_mappings(meta)
    return Preprocessing.from_json(meta["preprocessing"])


def artifact_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The ``ubc.*`` metadata every artifact carries from its export (``EMBEDDED_SETTINGS``
    of meta.json as JSON text)."""
    return {f"ubc.{key}": json.dumps(meta[key], sort_keys=True) for key in EMBEDDED_SETTINGS}


def artifact_metadata_mismatch(meta: dict[str, Any],
                               embedded: Mapping[str, str]) -> str | None:
    """Why the ``ubc.*`` metadata ``embedded`` in an artifact disagrees with meta.json
    (meta.json edited by hand, or the artifact made for another bundle), or None. The
    one comparison every engine and the weights make."""
    for key, expected in artifact_metadata(meta).items():
        if key not in embedded:
            return f"it carries no {key!r} metadata"
        try:
            same = json.loads(embedded[key]) == json.loads(expected)
        except (TypeError, ValueError):
            same = False
        if not same:
            return f"its {key} {embedded[key]} differs from meta.json's {expected}"
    return None


def weights_with_metadata(state_dict: Mapping[str, Any],
                          meta: dict[str, Any]) -> OrderedDict[str, Any]:
    """``state_dict`` as weights.pt stores it: the settings it was trained with
    (``artifact_metadata``) in its state-dict metadata, which ``torch.save`` and
    ``torch.load(weights_only=True)`` keep and ``load_state_dict`` ignores (plain PyTorch
    sees an ordinary state dict)."""
    saved: OrderedDict[str, Any] = OrderedDict(state_dict)
    metadata = OrderedDict(getattr(state_dict, "_metadata", None) or {})
    metadata[""] = {**metadata.get("", {}), **artifact_metadata(meta)}
    saved._metadata = metadata  # type: ignore[attr-defined]
    return saved


def weights_metadata(state_dict: Mapping[str, Any]) -> dict[str, str]:
    """The ``ubc.*`` metadata saved with a state dict; empty for weights saved without it."""
    root = (getattr(state_dict, "_metadata", None) or {}).get("", {})
    if not isinstance(root, dict):
        return {}
    return {k: v for k, v in root.items() if isinstance(k, str) and k.startswith("ubc.")}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Bundle:
    """An opened bundle directory; ``meta`` is the parsed meta.json."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise BundleError(f"{self.path}: not a UBC bundle (no {META_FILE}); "
                              "make one with `ubc-train --out DIR`")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{meta_path}: unreadable meta.json ({exc})") from exc
        try:
            self.preprocessing = checked_meta(meta)
        except BundleError as exc:
            raise BundleError(f"{meta_path}: {exc}") from None
        self.meta: dict[str, Any] = meta
        self._verified: dict[str, tuple[int, int]] = {}

    @property
    def arch(self) -> str:
        return str(self.meta["arch"])

    @property
    def name(self) -> str:
        """The bundle's folder name without ``.ubc``: a bundle built in a temporary folder
        and moved into place is named by where it lives."""
        return self.path.resolve().name.removesuffix(".ubc")

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def weights_sha256(self) -> str:
        return str(self.meta["files"][WEIGHTS_FILE])

    def has(self, name: str) -> bool:
        return name in self.meta["files"] and (self.path / name).is_file()

    def file(self, name: str) -> Path:
        """Path of an artifact whose sha256 matches meta.json; BundleError otherwise."""
        expected = self.meta["files"].get(name)
        path = self.path / name
        if expected is None:
            raise BundleError(f"{self.path}: no artifact {name!r} in meta.json")
        if not path.is_file():
            raise BundleError(f"{path}: listed in meta.json but missing")
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        if self._verified.get(name) != stamp:
            actual = sha256_of(path)
            if actual != expected:
                raise BundleError(f"{path}: sha256 {actual[:12]}... does not match meta.json "
                                  f"({expected[:12]}...): the file was changed or corrupted; "
                                  "re-export it")
            self._verified[name] = stamp
        return path

    def write_file(self, name: str, write: Callable[[Path], object],
                   **meta_entries: Any) -> Path:
        """Write artifact ``name`` with ``write(tmp_path)``, record its sha256, atomically."""
        path = self.path / name
        atomic_write(path, write)
        self.meta["files"][name] = sha256_of(path)
        self.update_meta(**meta_entries)
        return path

    def update_meta(self, **entries: Any) -> None:
        self.meta.update(entries)
        text = json.dumps(self.meta, indent=2, sort_keys=True)
        atomic_write(self.path / META_FILE, lambda tmp: tmp.write_text(text))

    def load_state_dict(self) -> dict[str, Any]:
        """weights.pt's tensors; BundleError when the settings saved with them (weights
        saved by ``create_bundle``) differ from meta.json's: a model trained at 64 x 64
        scores nonsense at 128 x 128, and an exporter would bake the wrong settings in."""
        import torch

        path = self.file(WEIGHTS_FILE)
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        embedded = weights_metadata(state)
        mismatch = artifact_metadata_mismatch(self.meta, embedded) if embedded else None
        if mismatch is not None:
            raise BundleError(f"{path}: {mismatch}: the model was trained with other "
                              "settings than meta.json now says; restore meta.json")
        return state


def create_bundle(path: str | os.PathLike[str], *, arch: str, state_dict: dict[str, Any],
                  preprocessing: Preprocessing, class_names: tuple[str, ...] = ("LGG", "HGG"),
                  top_k: int = 5, **meta_entries: Any) -> Bundle:
    """Create (or replace the weights of) a bundle directory and return it opened."""
    import torch

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # a service account other than the trainer's reads it
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "arch": arch,
        "preprocessing": preprocessing.to_json(), "class_names": list(class_names),
        "top_k": top_k, "files": {}, **meta_entries,
    }
    saved = weights_with_metadata(state_dict, meta)
    weights = atomic_write(root / WEIGHTS_FILE, lambda tmp: torch.save(saved, tmp))
    meta["files"] = {WEIGHTS_FILE: sha256_of(weights)}
    atomic_write(root / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return Bundle(root)
