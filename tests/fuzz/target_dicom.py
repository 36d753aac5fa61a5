"""Fuzz target ``dicom``: bytes written to a file, recognised (``is_dicom_file``), its header
read as discovery does (``read_header``), the file assembled as a one-instance series
(``load_series``), checked (``check_volume``) and cut into model slices, as ``ubc-infer``
treats every DICOM file of an archive.

Allowed outcomes: not DICOM (no marker), a non-image object (``read_header`` says so), a
volume whose slices are finite, ``UBCInputError`` naming the file, or a preprocessing refusal
of a volume the reader rightly accepted. Anything else, a warning included, is a finding.

Seeds (``corpus/dicom/``, written by ``python -m tests.fuzz.target_dicom``): tiny MR
instances, single- and multi-frame (Enhanced MR), rescaled, oblique.
"""

from __future__ import annotations

import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .target_nifti import check_slices  # one slice check for every volume reader

NAME = "dicom"
INSTRUMENT = ("ubc", "pydicom")
SEEDS = Path(__file__).resolve().parent / "corpus" / NAME
REGRESSIONS = Path(__file__).resolve().parent / "regressions" / NAME


def prepare() -> Callable[[bytes], None]:
    """Import the code under test and return the function that runs one input."""
    import logging

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    from ubc.errors import UBCInputError
    from ubc.io.conformance import check_volume
    from ubc.io.dicom import is_dicom_file, load_series, read_header

    path = Path(tempfile.mkdtemp(prefix="ubc-fuzz-dicom-")) / "input.dcm"

    def one_input(data: bytes) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            # pydicom warns (and then copes) on every odd value: its words, not a finding
            warnings.filterwarnings("ignore", module="pydicom.*")
            run(data)

    def run(data: bytes) -> None:
        path.write_bytes(data)
        if not is_dicom_file(path):
            return
        try:
            header = read_header(path)
            if header is None or not header.image:
                return
            volume, sources = load_series([path])
            volume = check_volume(volume, target_spacing=(1.0, 1.0)).volume
        except UBCInputError as exc:
            assert str(path) in str(exc) or str(path.parent) in str(exc), \
                f"error does not name the file: {exc}"
            return
        assert volume.data.ndim == 3 and min(volume.data.shape) > 0
        assert len(sources) == volume.data.shape[volume_axis(volume)]
        assert all(math.isfinite(s) and s > 0 for s in volume.spacing), volume.spacing
        check_slices(volume)

    return one_input


def volume_axis(volume: object) -> int:
    """The canonical axis that holds the stored slice axis (k) of the volume."""
    from nibabel import orientations

    ornt = orientations.io_orientation(volume.original_affine)  # type: ignore[attr-defined]
    return int(ornt[2][0])


def dicom_seeds(folder: Path) -> dict[str, bytes]:
    """File name -> bytes of every seed (each under the fuzzer's 4 kB input limit)."""
    from ubc.io.dicom_write import SeriesSpec, write_series
    from ubc.synth import phantom_affine

    data = np.zeros((8, 8, 4), np.int16)  # a zero background around a 4 x 4 x 2 "brain"
    data[2:6, 2:6, 1:3] = (np.arange(32).reshape(4, 4, 2) % 11 + 1) * 10
    angle = np.radians(15.0)
    oblique = np.array([[0.9, 0, 0, -5], [0, 0.9 * np.cos(angle), -2 * np.sin(angle), 7],
                        [0, 0.9 * np.sin(angle), 2 * np.cos(angle), 3], [0, 0, 0, 1]])
    cases = {"single": (phantom_affine(data.shape), (1.0, 0.0), False),
             "multiframe": (phantom_affine(data.shape), (1.0, 0.0), True),
             "rescaled": (oblique, (0.5, 10.0), False),
             "oblique_multiframe": (oblique, (1.0, 0.0), True)}
    seeds = {}
    for name, (affine, rescale, multiframe) in cases.items():
        values = data.astype(np.float64) * rescale[0] + rescale[1]
        spec = SeriesSpec("1.2.3.4", f"1.2.3.4.{len(seeds) + 1}", "1.2.3.4.9",
                          rescale=rescale)
        files = write_series(values, affine, folder / name, spec, multiframe=multiframe)
        seeds[f"{name}.dcm"] = files[len(files) // 2].read_bytes()
    return seeds


def main() -> int:
    SEEDS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        for name, raw in sorted(dicom_seeds(Path(folder)).items()):
            (SEEDS / name).write_bytes(raw)
            print(f"{len(raw):6d}  {SEEDS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
