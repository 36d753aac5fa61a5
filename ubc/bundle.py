"""The model bundle: one directory ``NAME.ubc/`` holding meta.json and every artifact.

meta.json records the sha256 of every file; an artifact whose bytes do not match is refused.
Writes are atomic: a file is written beside its final name and renamed into place, and
meta.json is rewritten the same way, so a killed writer leaves the previous bundle usable.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ubc.atomic import atomic_write
from ubc.errors import BundleError

META_FILE = "meta.json"
WEIGHTS_FILE = "weights.pt"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "arch", "preprocessing", "class_names", "top_k", "files")


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
    def from_json(cls, entry: dict[str, Any]) -> Preprocessing:
        return cls(size=(int(entry["size"][0]), int(entry["size"][1])),
                   target_spacing=(float(entry["target_spacing"][0]),
                                   float(entry["target_spacing"][1])),
                   norm=str(entry["norm"]))


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
        missing = [k for k in _REQUIRED if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise BundleError(f"{meta_path}: malformed meta.json, missing {', '.join(missing)}")
        try:
            self.preprocessing = Preprocessing.from_json(meta["preprocessing"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"{meta_path}: malformed 'preprocessing' entry ({exc})") from exc
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
        import torch

        return torch.load(self.file(WEIGHTS_FILE), map_location="cpu", weights_only=True)


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
    atomic_write(root / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    bundle = Bundle(root)
    bundle.write_file(WEIGHTS_FILE, lambda tmp: torch.save(state_dict, tmp))
    return bundle
