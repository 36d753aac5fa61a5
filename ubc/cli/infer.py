"""``ubc-infer``: score an archive of brain MRI volumes with a model bundle (argument parsing
only; the work is ``ubc.scoring.score_archive``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ubc.errors import UBCError

if TYPE_CHECKING:
    from ubc.scoring import ScoringOptions

EXIT_OK, EXIT_FAILED_CASES, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_EPILOG = """\
input:
  a folder tree (BraTS layouts <case>/<case>_flair.nii.gz and <case>/<case>-t2f.nii.gz
  recognised: the case id is the folder name; otherwise every NIfTI file matching
  --pattern is a case, its id the path relative to the folder without extension), a text
  file with one path per line, a CSV manifest with columns case_id,image, or a single
  .nii/.nii.gz file.

output (--out, format by extension: .csv, .jsonl, .parquet), one row per case:
  case_id, path, status (ok | no_lesion | error), error, p_hgg, predicted_class,
  lesion_volume_ml, slices_total, slices_scored, slices_used (top-k axial indices), model,
  bundle_sha256, backend, precision, seconds, input_bytes, input_mtime_ns.
  P(HGG) is the mean over the top-k slices by predicted lesion area; no_lesion means the
  predicted lesion volume is under --min-lesion-ml (no class is forced).
  Rows are appended and fsync'ed case by case: re-running with the same --out skips the
  cases already there (same case id, same file size and mtime), so a killed run resumes.

exit codes:
  0  every case is ok or no_lesion
  1  some cases failed: their rows have status "error" and say why
  2  usage error: bad arguments, unknown or broken bundle, unreadable input, or an --out
     that is not a results file of this model
  3  the run stopped on an internal error (re-run to resume)
  130 interrupted (Ctrl-C); re-run to resume
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ubc-infer``."""
    from ubc.scoring.aggregate import DEFAULT_MIN_LESION_ML
    from ubc.scoring.discover import DEFAULT_PATTERN

    p = argparse.ArgumentParser(
        prog="ubc-infer", description="Score every volume of an archive with a UBC bundle: "
        "P(HGG) from the top-k slices by predicted lesion area, lesion volume, optional "
        "masks and overlays.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="BUNDLE", help="model bundle directory")
    p.add_argument("--input", required=True, metavar="PATH",
                   help="folder, text list, CSV manifest or NIfTI file")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="results file: .csv, .jsonl or .parquet")
    p.add_argument("--masks", metavar="DIR", help="write each predicted mask as NIfTI here, in "
                   "the input's grid, orientation and affine")
    p.add_argument("--overlays", metavar="DIR", help="write a PNG of each case's top slices")
    p.add_argument("--backend", default="auto", help="auto, torch, onnxruntime, openvino, aoti "
                   "or tensorrt (default: auto, the fastest this machine runs)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="slices per engine call (default: the engine's, at most 32)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="loader threads (default: 2)")
    p.add_argument("--pattern", default=None, metavar="GLOB",
                   help=f"image files to take in a folder, alternatives separated by | "
                   f"(default: {DEFAULT_PATTERN!r}, case-insensitive)")
    p.add_argument("--top-k", type=int, metavar="K", help="slices averaged (default: bundle's)")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N cases")
    p.add_argument("--min-lesion-ml", type=float, default=DEFAULT_MIN_LESION_ML, metavar="ML",
                   help=f"no_lesion under this volume (default: {DEFAULT_MIN_LESION_ML} mL)")
    p.add_argument("--retry-errors", action="store_true",
                   help="score again the cases whose earlier row is an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    return p


def _options(args: argparse.Namespace) -> ScoringOptions:
    from ubc.scoring import ScoringOptions

    return ScoringOptions(batch_size=args.batch_size, workers=args.workers, top_k=args.top_k,
                          min_lesion_ml=args.min_lesion_ml, retry_errors=args.retry_errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ubc-infer``; returns the exit code (see ``--help``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from ubc.scoring import score_archive
    from ubc.scoring.pipeline import PipelineError

    try:
        summary = score_archive(args.model, args.input, args.out, masks=args.masks,
                                overlays=args.overlays, backend=args.backend,
                                device=args.device, pattern=args.pattern, limit=args.limit,
                                options=_options(args), progress=not args.quiet)
    except PipelineError as exc:
        print(f"ubc-infer: {exc}; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERNAL
    except (UBCError, ValueError, OSError) as exc:  # raised before any case is scored
        print(f"ubc-infer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ubc-infer: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(summary.format())
    return EXIT_FAILED_CASES if summary.failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
