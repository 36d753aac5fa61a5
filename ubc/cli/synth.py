"""``ubc-synth``: write a BraTS-layout archive of synthetic phantoms (FLAIR + seg + labels),
or (``--format dicom``) the same phantoms as DICOM studies (FLAIR + a decoy T1 series).

    ubc-synth OUT_DIR --cases 152 --seed 0 [--shape 240 240 155] [--core-contrast 0.6] ...
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from typing import Any

from ubc.synth import SynthConfig, write_archive, write_dicom_archive


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ubc-synth", description="Write synthetic glioma phantoms in the BraTS 2019 "
        "layout (HGG/ and LGG/ case folders with _flair and _seg .nii.gz, and labels.csv).")
    parser.add_argument("out_dir", help="output folder (created)")
    parser.add_argument("--cases", type=int, default=20, help="number of phantoms, half "
                        "of each grade (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155),
                        metavar=("X", "Y", "Z"), help="volume size in 1 mm voxels")
    parser.add_argument("--format", choices=("nifti", "dicom"), default="nifti",
                        help="nifti (default): the BraTS layout; dicom: one study per case "
                        "with a FLAIR and a decoy T1 series (pip install ubc[dicom])")
    knobs = parser.add_argument_group("difficulty knobs (see ubc.synth.SynthConfig)")
    for f in fields(SynthConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            knobs.add_argument(flag, type=float, nargs=2, default=f.default,
                               metavar=("MIN", "MAX"))
        else:
            knobs.add_argument(flag, type=type(f.default), default=f.default)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cases < 1:
        print("ubc-synth: --cases must be at least 1", file=sys.stderr)
        return 2
    knobs: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(SynthConfig)}
    knobs = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
    config = SynthConfig(**knobs)
    start = time.perf_counter()
    writer = write_dicom_archive if args.format == "dicom" else write_archive
    root = writer(args.out_dir, args.cases, seed=args.seed, shape=tuple(args.shape),
                  config=config, progress=True)
    print(f"wrote {args.cases} phantoms to {root} in {time.perf_counter() - start:.1f} s "
          f"(labels: {root / 'labels.csv'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
