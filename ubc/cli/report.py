"""``ubc-report``: the HTML report of an existing run (argument parsing only; the work is
``ubc.scoring.report.write_report``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ubc-report``."""
    p = argparse.ArgumentParser(
        prog="ubc-report", description="Write one static HTML page for a results file of "
        "ubc-infer: the run, plots, a sortable and filterable table of every case, and each "
        "case's picture (its overlay; or drawn now from its mask with --masks).")
    p.add_argument("results", metavar="RESULTS", help="results file: .csv, .jsonl or .parquet")
    p.add_argument("--out", required=True, metavar="FILE", help="the page (.html); its "
                   "pictures go to FILE_files/ beside it")
    p.add_argument("--overlays", metavar="DIR", help="the run's --overlays folder (default: "
                   "FILE_files/overlays, where ubc-infer --report writes them)")
    p.add_argument("--masks", metavar="DIR", help="the run's --masks folder: cases without "
                   "an overlay get a picture drawn from their input and mask")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ubc-report``; 0 when the page was written, 2 when it could not be."""
    args = build_parser().parse_args(argv)
    from ubc.errors import UBCError
    from ubc.scoring import read_results
    from ubc.scoring.report import RunInfo, write_report

    if not Path(args.results).is_file():
        print(f"ubc-report: error: {args.results}: no such results file", file=sys.stderr)
        return 2
    try:
        rows = read_results(args.results)
        page = write_report(rows, args.out, overlays=args.overlays, masks=args.masks,
                            run=RunInfo.now())
    except (UBCError, ValueError, OSError) as exc:
        print(f"ubc-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"{page} ({len(rows)} cases)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
