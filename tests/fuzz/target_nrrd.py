"""Fuzz target ``nrrd``: bytes written to a ``.nrrd`` file, read by ``ubc.io.nrrd.load_nrrd``
(pynrrd parses the header, our bounded readers take the voxels) and cut into model slices,
as ``ubc-infer`` treats every NRRD file of an archive.

Allowed outcomes: a volume whose slices are finite, ``UBCInputError`` naming the file, or a
preprocessing refusal of a volume the reader rightly accepted. Anything else, a warning
included, is a finding.

Seeds (``corpus/nrrd/``, written by ``python -m tests.fuzz.target_nrrd``): tiny volumes of
each integer and float type, raw and gzip, in LPS and RAS, oblique, big-endian.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .target_nifti import check_volume  # one check for every volume file reader

NAME = "nrrd"
INSTRUMENT = ("ubc", "nrrd")
SEEDS = Path(__file__).resolve().parent / "corpus" / NAME
REGRESSIONS = Path(__file__).resolve().parent / "regressions" / NAME


def prepare() -> Callable[[bytes], None]:
    """Import the code under test and return the function that runs one input."""
    from ubc.errors import UBCInputError
    from ubc.io.nrrd import load_nrrd

    path = Path(tempfile.mkdtemp(prefix="ubc-fuzz-nrrd-")) / "input.nrrd"

    def one_input(data: bytes) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(data)

    def run(data: bytes) -> None:
        path.write_bytes(data)
        try:
            volume = load_nrrd(path)
        except UBCInputError as exc:
            assert str(path) in str(exc), f"error does not name the file: {exc}"
            return
        check_volume(volume)

    return one_input


def nrrd_bytes(data: np.ndarray, header: dict[str, object]) -> bytes:
    """The bytes of a .nrrd file with attached data, as pynrrd writes it."""
    import nrrd

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seed.nrrd"
        nrrd.write(str(path), data, dict(header), index_order="F")
        return path.read_bytes()


def nrrd_seeds() -> dict[str, bytes]:
    """File name -> bytes of every seed (each under the fuzzer's 4 kB input limit)."""
    data = np.zeros((6, 6, 4))
    data[1:5, 1:5, 1:3] = np.arange(32).reshape(4, 4, 2) % 7 + 1
    lps = {"space": "left-posterior-superior", "space directions": np.diag([0.9, 0.9, 2.0]),
           "space origin": np.array([-3.0, 4.0, 5.0])}
    angle = np.radians(20.0)
    oblique = {"space": "right-anterior-superior", "space origin": np.zeros(3),
               "space directions": np.array([[1.0, 0, 0],
                                             [0, np.cos(angle), np.sin(angle)],
                                             [0, -2 * np.sin(angle), 2 * np.cos(angle)]])}
    seeds = {}
    for dtype in ("uint8", "int16", "uint16", "int32", "float32", "float64"):
        seeds[f"{dtype}.nrrd"] = nrrd_bytes(data.astype(dtype), {**lps, "encoding": "raw"})
    seeds["gzip.nrrd"] = nrrd_bytes(data.astype("int16"), {**lps, "encoding": "gzip"})
    seeds["oblique.nrrd"] = nrrd_bytes(data.astype("int16"), {**oblique, "encoding": "raw"})
    seeds["spacings.nrrd"] = nrrd_bytes(data.astype("uint8"),
                                        {"spacings": [1.0, 1.0, 3.0], "encoding": "raw"})
    seeds["big_endian.nrrd"] = nrrd_bytes(data.astype(">i2"),
                                          {**lps, "encoding": "raw", "endian": "big"})
    return seeds


def main() -> int:
    SEEDS.mkdir(parents=True, exist_ok=True)
    for name, raw in sorted(nrrd_seeds().items()):
        (SEEDS / name).write_bytes(raw)
        print(f"{len(raw):6d}  {SEEDS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
