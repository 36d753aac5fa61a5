"""``ubc-infer``: score an archive of brain MRI volumes with a model bundle (argument parsing
only; the work is ``ubc.scoring.score_archive``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ubc.errors import UBCError

if TYPE_CHECKING:
    from ubc.scoring import OutputSpec, RunSummary, ScoringOptions

EXIT_OK, EXIT_FAILED_CASES, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_EPILOG = """\
input:
  a folder tree (BraTS layouts <case>/<case>_flair.nii.gz and <case>/<case>-t2f.nii.gz
  recognised: the case id is the folder name; otherwise every NIfTI or NRRD file matching
  --pattern is a case, its id the path relative to the folder without extension), a text
  file with one path per line, a CSV manifest with columns case_id,image, or a single
  NIfTI, NRRD or DICOM file (recognised by its content, whatever its name). Volume files
  of the folder that do not match --pattern are named in the summary (all: --skipped).
  DICOM files in the folder (found by content, any names and nesting) are grouped by
  study: each study is a case (id: its StudyInstanceUID, see --case-id) and its FLAIR
  series is chosen by rules (see --series-select). A .zip of either is read too.

output (--out, format by extension: .csv, .jsonl, .parquet), one row per case:
  case_id, path, status (ok | no_lesion | error), error, p_hgg, predicted_class,
  lesion_volume_ml, slices_total, slices_scored, slices_used (top-k axial indices), model,
  bundle_sha256, backend, precision, seconds, input_bytes, input_mtime_ns, input_digest,
  flags (inputs the model was not trained for, e.g. thick_slices:5.5mm; how a series was
  chosen), study_uid, series_uid, series_description (DICOM).
  Inputs that cannot be scored meaningfully (not skull-stripped, background not 0 and not
  recoverable, NaN inside the head) and implausible outputs (lesion > 50% of the brain)
  are error rows that say why and what to do.
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
                   help="folder, text list, CSV manifest, NIfTI or NRRD file")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="results file: .csv, .jsonl or .parquet")
    p.add_argument("--masks", metavar="DIR", help="write each predicted mask as NIfTI here, in "
                   "the input's grid, orientation and affine")
    p.add_argument("--overlays", metavar="DIR", help="write a PNG of each case's top slices")
    p.add_argument("--report", metavar="FILE", help="write one HTML page for the whole "
                   "results file (rewritten by a resumed run), its pictures beside it in "
                   "FILE_files/ (or --overlays)")
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
    p.add_argument("--skipped", metavar="FILE", help="write the files of the folder that look "
                   "like volumes but are not cases (their names do not match --pattern) as "
                   "a CSV path,reason; the summary names the first few")
    p.add_argument("--top-k", type=int, metavar="K", help="slices averaged (default: bundle's)")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N cases")
    p.add_argument("--min-lesion-ml", type=float, default=DEFAULT_MIN_LESION_ML, metavar="ML",
                   help=f"no_lesion under this volume (default: {DEFAULT_MIN_LESION_ML} mL)")
    p.add_argument("--retry-errors", action="store_true",
                   help="score again the cases whose earlier row is an error")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log what happens, third-party warnings included")
    _add_scale_out(p)
    _add_dicom(p)
    return p


def _add_dicom(p: argparse.ArgumentParser) -> None:
    """The DICOM options (issue 12)."""
    g = p.add_argument_group(
        "DICOM", "studies in, DICOM SEG out (pip install ubc[dicom]); each row also carries "
        "flags, study_uid, series_uid and series_description")
    g.add_argument("--series-select", metavar="RULE", help="which series of a study to score "
                   "instead of the FLAIR rules: a regex on SeriesDescription ('ax.*flair'), or "
                   "rules joined by ';' ('SeriesDescription=flair;InversionTime>=1800')")
    g.add_argument("--case-id", choices=("study", "patient", "folder"), default="study",
                   help="the id of a study's row: its StudyInstanceUID (default), PatientID + "
                   "StudyDate (identifying: only if you want it in rows and file names), or "
                   "its folder relative to --input")
    g.add_argument("--dicom-seg", metavar="DIR", help="write one DICOM Segmentation per scored "
                   "study here (segment 'lesion', referencing the source series)")


def _add_scale_out(p: argparse.ArgumentParser) -> None:
    """The options that take a run beyond one machine (issue 13)."""
    g = p.add_argument_group(
        "scale out", "one machine (default); deterministic parts for job arrays (--num-parts, "
        "--part-id, then --merge); or a Ray cluster (--ray). With several nodes, the bundle, "
        "the input and the --masks/--overlays folders must be on storage every node sees at "
        "the same path.")
    g.add_argument("--ray", nargs="?", const="auto", metavar="auto|local|ADDRESS",
                   help="score on Ray (pip install ubc[ray]): auto = the running cluster or a "
                   "new local one, local = a new local instance, or the head's HOST:6379")
    g.add_argument("--actors", metavar="MIN,MAX", help="engine actors with --ray (default: 1 "
                   "up to one per GPU, or on CPUs up to one per CPU but one)")
    g.add_argument("--num-parts", type=int, metavar="N",
                   help="split the archive into N parts by a hash of the case id")
    g.add_argument("--part-id", type=int, metavar="I", help="score part I (0 .. N-1) only")
    g.add_argument("--merge", nargs="+", metavar=("OUT", "PART"),
                   help="ubc-infer --merge OUT PART... [--model BUNDLE] [--input ARCHIVE]: "
                   "check the part files of one --num-parts run (one model, each case once; "
                   "with --input: none missing) and write them as one file OUT")


def _merge(argv: list[str]) -> int:
    """``ubc-infer --merge OUT PART... [--model B] [--input A [--pattern G]]``."""
    from ubc.bundle import Bundle
    from ubc.scoring.discover import discover_cases
    from ubc.scoring.shards import merge_results

    p = argparse.ArgumentParser(prog="ubc-infer --merge", description="Merge part files.")
    p.add_argument("--merge", nargs="+", required=True, metavar=("OUT", "PART"))
    p.add_argument("--model", metavar="BUNDLE", help="the parts must be this model's")
    p.add_argument("--input", metavar="PATH", help="the archive: every case must be merged")
    p.add_argument("--pattern", default=None, metavar="GLOB")
    p.add_argument("--case-id", default="study", help="as given to the part runs")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if len(args.merge) < 2:
        p.error("--merge takes OUT and at least one PART file")
    try:
        cases = None if args.input is None else discover_cases(
            args.input, pattern=args.pattern, case_id=args.case_id)
        sha = None if args.model is None else Bundle(args.model).weights_sha256
        summary = merge_results(args.merge[0], args.merge[1:], cases=cases, bundle_sha256=sha)
    except (UBCError, ValueError, OSError) as exc:
        print(f"ubc-infer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet:
        print(summary.format())
    return EXIT_FAILED_CASES if summary.counts.get("error") else EXIT_OK


def _runner(args: argparse.Namespace, parser: argparse.ArgumentParser) \
        -> tuple[Callable[..., RunSummary], dict[str, Any]]:
    """The scoring function for the scale-out options, and its extra arguments."""
    import importlib.util

    if (args.num_parts is None) != (args.part_id is None):
        parser.error("--num-parts and --part-id go together")
    part = None if args.num_parts is None else (args.num_parts, args.part_id)
    if part is not None:
        from ubc.scoring.shards import check_part

        try:
            check_part(*part)
        except ValueError as exc:
            parser.error(str(exc))
    if args.ray is None:
        if args.actors is not None:
            parser.error("--actors needs --ray")
        from ubc.scoring import score_archive

        return score_archive, {"part": part}
    if importlib.util.find_spec("ray") is None:
        parser.error("--ray needs Ray: pip install ubc[ray]")
    from ubc.scoring.ray_runner import RayOptions, parse_actors, score_archive_ray

    try:
        actors = None if args.actors is None else parse_actors(args.actors)
    except ValueError as exc:
        parser.error(str(exc))
    return score_archive_ray, {"part": part,
                               "ray_options": RayOptions(address=args.ray, actors=actors)}


def _options(args: argparse.Namespace) -> ScoringOptions:
    from ubc.scoring import ScoringOptions

    return ScoringOptions(batch_size=args.batch_size, workers=args.workers, top_k=args.top_k,
                          min_lesion_ml=args.min_lesion_ml, retry_errors=args.retry_errors,
                          series_select=args.series_select, case_id=args.case_id)


def _outputs(args: argparse.Namespace) -> OutputSpec:
    from ubc.scoring import OutputSpec

    return OutputSpec.of(args.out, masks=args.masks, overlays=args.overlays,
                         dicom_seg=args.dicom_seg, report=args.report, skipped=args.skipped)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ubc-infer``; returns the exit code (see ``--help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--merge" in argv:
        return _merge(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from ubc.quiet import configure_logging
    from ubc.scoring.pipeline import PipelineError

    configure_logging(args.verbose)

    run, extra = _runner(args, parser)
    try:
        summary = run(args.model, args.input, _outputs(args), backend=args.backend,
                      device=args.device, pattern=args.pattern, limit=args.limit,
                      options=_options(args), progress=not args.quiet, **extra)
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
