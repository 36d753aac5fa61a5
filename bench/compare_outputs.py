"""Do two ``ubc-infer`` runs over the same archive agree? Rows identical except their timing
column (``seconds``), masks voxel-identical (and on the same affine), DICOM SEG frames
identical (their UIDs differ by design). Used to check that a speed-up changes no output:

    python bench/compare_outputs.py BEFORE_DIR AFTER_DIR

where each folder holds ``scores.csv`` and optionally ``masks/`` and ``seg/``. Exit 0 when
they agree, 1 (with the differences listed) otherwise.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

TIMING = {"seconds"}


def _rows(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "scores.csv", newline="") as f:
        return {r["case_id"]: {k: v for k, v in r.items() if k not in TIMING}
                for r in csv.DictReader(f)}


def _seg_frames(path: Path) -> np.ndarray:
    import pydicom

    return np.asarray(pydicom.dcmread(path).pixel_array)


def compare(before: Path, after: Path) -> list[str]:
    """The differences between two runs' outputs (empty when they agree)."""
    problems = []
    a, b = _rows(before), _rows(after)
    if a.keys() != b.keys():
        problems.append(f"cases differ: {sorted(a.keys() ^ b.keys())}")
    for case in sorted(a.keys() & b.keys()):
        diff = {k for k in a[case] if a[case][k] != b[case].get(k)}
        if diff:
            problems.append(f"{case}: row differs in {sorted(diff)}")
    for sub, suffix in (("masks", ".nii.gz"), ("seg", ".dcm")):
        names = sorted(p.name for p in (before / sub).glob(f"*{suffix}"))
        if names != sorted(p.name for p in (after / sub).glob(f"*{suffix}")):
            problems.append(f"{sub}: different files")
        for name in names:
            x, y = before / sub / name, after / sub / name
            if sub == "masks":
                u, v = nib.load(x), nib.load(y)
                same = np.array_equal(np.asanyarray(u.dataobj), np.asanyarray(v.dataobj)) \
                    and np.array_equal(u.affine, v.affine)
            else:
                same = np.array_equal(_seg_frames(x), _seg_frames(y))
            if not same:
                problems.append(f"{sub}/{name}: differs")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__)
        return 2
    problems = compare(Path(args[0]), Path(args[1]))
    for line in problems:
        print(line)
    print("outputs agree" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
