"""Deterministic shards of an archive, for clusters without Ray (Slurm arrays, Kubernetes
jobs): ``ubc-infer --num-parts N --part-id I`` scores the cases whose id hashes to part I,
and ``ubc-infer --merge OUT PART_FILES...`` checks the parts and writes one results file.

A case's part depends on its id alone (the first 8 bytes of its SHA-256, modulo N), so it is
stable under re-discovery: files added to the archive, another listing order, another
machine or Python version never move a case to another part.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ubc.errors import UBCInputError
from ubc.scoring.discover import Case
from ubc.scoring.result import STATUSES, CaseResult
from ubc.scoring.writers import open_results, read_results

__all__ = ["part_of", "select_part", "check_part", "MergeSummary", "merge_results"]


def part_of(case_id: str, num_parts: int) -> int:
    """The part (0 .. num_parts - 1) that ``case_id`` belongs to."""
    check_part(num_parts, 0)
    digest = hashlib.sha256(case_id.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % num_parts


def check_part(num_parts: int, part_id: int) -> None:
    """ValueError unless ``0 <= part_id < num_parts``."""
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"the number of parts must be an integer >= 1, got {num_parts!r}")
    if isinstance(part_id, bool) or not isinstance(part_id, int) \
            or not 0 <= part_id < num_parts:
        raise ValueError(f"the part id must be an integer in 0..{num_parts - 1}, got "
                         f"{part_id!r}")


def select_part(cases: Sequence[Case], num_parts: int, part_id: int) -> list[Case]:
    """The cases of part ``part_id`` of ``num_parts``, in their discovery order."""
    check_part(num_parts, part_id)
    return [c for c in cases if part_of(c.case_id, num_parts) == part_id]


@dataclass(frozen=True)
class MergeSummary:
    """What ``merge_results`` wrote: the file, its rows by status, the parts it read."""

    out: Path
    rows: int
    counts: dict[str, int]
    parts: int

    def format(self) -> str:
        counts = ", ".join(f"{s} {self.counts.get(s, 0)}" for s in STATUSES)
        return f"merged {self.parts} parts into {self.out}: {self.rows} cases ({counts})"


def _read_parts(parts: Sequence[Path]) -> dict[Path, list[CaseResult]]:
    rows = {}
    for path in parts:
        if not path.is_file():
            raise UBCInputError(f"{path}: no such results file")
        rows[path] = read_results(path)
    return rows


def _check_one_model(rows: dict[Path, list[CaseResult]], bundle_sha256: str | None) -> None:
    models: dict[str, Path] = {}
    for path, part in rows.items():
        for row in part:
            if row.bundle_sha256 is not None:
                models.setdefault(row.bundle_sha256, path)
    if bundle_sha256 is not None:
        models.setdefault(bundle_sha256, Path("--model"))
    if len(models) > 1:
        (a, first), (b, second) = list(models.items())[:2]
        raise UBCInputError(f"the parts come from different models: {first} holds weights "
                            f"sha256 {a[:12]}..., {second} holds {b[:12]}...; merge the "
                            "parts of one run only")


def _check_one_split(rows: dict[Path, list[CaseResult]]) -> None:
    """Each file holds one part of the same N-way split (N = the number of files), no two
    files the same part, and no case in two places."""
    num_parts, seen, where = len(rows), {}, {}  # type: ignore[var-annotated]
    for path, part in rows.items():
        for row in part:
            if row.case_id in where:
                raise UBCInputError(f"case {row.case_id!r} is in {where[row.case_id]} and in "
                                    f"{path}: the parts overlap")
            where[row.case_id] = path
        ids = {part_of(r.case_id, num_parts) for r in part}
        if len(ids) > 1:
            raise UBCInputError(f"{path}: its cases belong to several of {num_parts} parts; "
                                f"give exactly the {num_parts} part files of one "
                                "--num-parts run")
        for part_id in ids:
            if part_id in seen:
                raise UBCInputError(f"{seen[part_id]} and {path} are the same part "
                                    f"({part_id} of {num_parts})")
            seen[part_id] = path


def _check_archive(found: set[str], cases: Sequence[Case]) -> None:
    expected = {c.case_id for c in cases}
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing:
        raise UBCInputError(f"{len(missing)} cases of the archive are in no part (first: "
                            f"{missing[0]!r}); finish those part runs (re-run them to resume)")
    if extra:
        raise UBCInputError(f"{len(extra)} cases are not in the archive (first: "
                            f"{extra[0]!r}); the parts come from another archive")


def merge_results(out: str | os.PathLike[str], parts: Sequence[str | os.PathLike[str]], *,
                  cases: Sequence[Case] | None = None,
                  bundle_sha256: str | None = None) -> MergeSummary:
    """Check the part files of one ``--num-parts N`` run (N = ``len(parts)``) and write
    their rows, sorted by case id, into ``out`` (format by extension), atomically.

    Refused (``UBCInputError``, nothing written): rows of different models (or not of
    ``bundle_sha256``), files that are not the N distinct parts of one split, a case in two
    places, and, with ``cases`` (the archive, re-discovered), a case in no part or a case not
    in the archive. ``out`` must not exist yet nor be one of the parts.
    """
    paths = [Path(p) for p in parts]
    target = Path(out)
    if not paths:
        raise ValueError("merge needs at least one part file")
    if len({p.resolve() for p in paths}) != len(paths):
        raise UBCInputError("the same part file is given twice")
    if target.exists() or any(target.resolve() == p.resolve() for p in paths):
        raise UBCInputError(f"{target}: already exists; the merged file must be a new file")
    writer = open_results(target)  # an unknown extension fails before any reading
    rows = _read_parts(paths)
    _check_one_model(rows, bundle_sha256)
    _check_one_split(rows)
    merged = sorted((r for part in rows.values() for r in part), key=lambda r: r.case_id)
    if cases is not None:
        _check_archive({r.case_id for r in merged}, cases)
    target.parent.mkdir(parents=True, exist_ok=True)
    writer.start(merged)
    writer.close()
    return MergeSummary(out=target, rows=len(merged), parts=len(paths),
                        counts=dict(Counter(r.status for r in merged)))
