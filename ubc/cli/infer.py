"""``ubc-infer``: score an archive of brain MRI volumes with a model bundle (argument parsing
only; the work is ``ubc.scoring.score_archive``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ubc.errors import OutputFault, UBCError

if TYPE_CHECKING:
    from ubc.net import PacsSettings
    from ubc.scoring import OutputSpec, RunSummary, ScoringOptions

EXIT_OK, EXIT_FAILED_CASES, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

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
  chosen), study_uid, series_uid, series_description (DICOM), mask_file, seg_file,
  overlay_file (the case's outputs, relative to --out's folder), output_error (outputs
  that failed to write, and why), trained_on (where the model's training data came from),
  seg_stored (--store-seg: the stored SEG's SOPInstanceUID@node).
  From a PACS: one row per study (input_digest: a digest of the chosen series'
  SOPInstanceUIDs, so a re-run skips unchanged studies and scores again a study whose
  series gained instances); a PACS fault is an error row naming the step (find,
  metadata, retrieve, store) after --retries; --retry-errors completes them later.
  Inputs that cannot be scored meaningfully (not skull-stripped, background not 0 and not
  recoverable, NaN inside the head) and implausible outputs (lesion > 50% of the brain)
  are error rows that say why and what to do.
  P(HGG) is the mean over the top-k slices by predicted lesion area; no_lesion means the
  predicted lesion volume is under --min-lesion-ml (no class is forced).
  Rows are appended and fsync'ed case by case: re-running with the same --out skips the
  cases already there (same case id, same file size and mtime), so a killed run resumes.

exit codes:
  0  every case is ok or no_lesion, and every output was written
  1  some cases failed: their rows have status "error" and say why; or some outputs
     (mask, SEG, overlay) failed to write: those rows keep the score and say why in
     output_error (--retry-errors writes just those outputs)
  2  usage error: bad arguments, unknown or broken bundle, unreadable input, or an --out
     that is not a results file of this model
  3  the run stopped: an output folder is not writable or the disk is full (the message
     names the path; checked before the model loads, and at every write), or an internal
     error; rows already written stay: fix the cause and re-run to resume
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
                   help="folder, text list, CSV manifest, NIfTI or NRRD file, or a PACS: "
                   "http(s)://HOST/dicom-web or dicom://AET@HOST:PORT (see PACS below)")
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
    _add_pacs(p)
    return p


def _add_pacs(p: argparse.ArgumentParser) -> None:
    """The options of a PACS as --input (issue 29)."""
    g = p.add_argument_group(
        "PACS", "--input http(s)://HOST/dicom-web (DICOMweb: QIDO-RS, WADO-RS, STOW-RS) or "
        "dicom://CALLED_AET@HOST:PORT (DIMSE: C-FIND, C-GET or C-MOVE, C-STORE); one row per "
        "matching study; only the chosen series is retrieved (pip install ubc[pacs])")
    g.add_argument("--query", action="append", default=[], metavar="KEY=VALUE",
                   help="a study filter, repeatable: ModalitiesInStudy=MR, "
                   "StudyDate=20260101-20261231, StudyInstanceUID=...")
    g.add_argument("--auth-file", metavar="FILE", help="DICOMweb credentials: a file holding "
                   "a bearer token or user:password")
    g.add_argument("--ca-bundle", metavar="FILE", help="CA certificates to trust for https "
                   "(TLS is always verified; default: the system's)")
    g.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds per request (default: 30)")
    g.add_argument("--retries", type=int, default=3, metavar="N", help="tries again after a "
                   "failure, with backoff; then the study is an error row naming the step "
                   "(default: 3)")
    g.add_argument("--spool", metavar="DIR", help="where retrieved series wait while scored "
                   "(default: a temporary folder)")
    g.add_argument("--spool-max-gb", type=float, default=10.0, metavar="GB",
                   help="a study's series larger than this is an error row (default: 10)")
    g.add_argument("--keep-spool", action="store_true", help="keep the retrieved series")
    g.add_argument("--store-seg", nargs="?", const="", metavar="DEST",
                   help="send each study's DICOM SEG back to the --input PACS, or to DEST "
                   "(http(s)://.../dicom-web or AET@HOST:PORT); the row's seg_stored says "
                   "what was stored where; SEGs are written to --dicom-seg (default: "
                   "OUT-stem_seg/ beside --out)")
    g.add_argument("--ae-title", default="UBC", metavar="AET",
                   help="our AE title for DIMSE (default: UBC)")
    g.add_argument("--move-to", metavar="AET:PORT", help="DIMSE: C-MOVE to this AE title "
                   "(ours, as the PACS knows it) instead of C-GET, received on PORT")


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


def _outputs(args: argparse.Namespace, settings: PacsSettings | None) -> OutputSpec:
    from ubc.scoring import OutputSpec

    dicom_seg = args.dicom_seg
    if args.store_seg is not None and dicom_seg is None:
        out = Path(args.out)
        dicom_seg = out.with_name(f"{out.stem}_seg")
    spec = OutputSpec.of(args.out, masks=args.masks, overlays=args.overlays,
                         dicom_seg=dicom_seg, report=args.report, skipped=args.skipped)
    if args.store_seg is None:
        return spec
    from ubc.net import PacsSettings, open_store

    destination = args.store_seg or args.input
    return dataclasses.replace(spec, store_seg=open_store(destination,
                                                          settings or PacsSettings()))


def _is_pacs(text: str) -> bool:
    from ubc.net import is_pacs_url

    return is_pacs_url(text)


def _pacs_settings(args: argparse.Namespace, parser: argparse.ArgumentParser
                   ) -> PacsSettings | None:
    """The PACS settings when --input or --store-seg is a PACS (else None)."""
    pacs_input = _is_pacs(args.input)
    if not pacs_input and args.store_seg == "":
        parser.error("--store-seg without DEST stores back to the --input PACS; --input is "
                     "not one (give DEST: http(s)://.../dicom-web or AET@HOST:PORT)")
    if pacs_input and args.ray is not None:
        parser.error("--ray does not read a PACS yet: score it on one machine (or with "
                     "--num-parts)")
    if not pacs_input and args.store_seg is None:
        return None
    from ubc.net import PacsSettings
    from ubc.net.sources import parse_query, read_auth

    try:
        return PacsSettings(
            query=parse_query(args.query),
            auth=None if args.auth_file is None else read_auth(args.auth_file),
            ca_bundle=None if args.ca_bundle is None else Path(args.ca_bundle),
            timeout_s=args.timeout, retries=args.retries,
            spool=None if args.spool is None else Path(args.spool),
            spool_max_gb=args.spool_max_gb, keep_spool=args.keep_spool,
            ae_title=args.ae_title, move_to=args.move_to)
    except (ValueError, UBCError) as exc:
        parser.error(str(exc))


def _warn_if_synthetic(model: str) -> None:
    """The one line at start for a model trained on phantoms (``ubc.provenance``)."""
    from ubc.bundle import Bundle
    from ubc.provenance import TrainingData, synthetic_warning

    warning = synthetic_warning(TrainingData.of_bundle(Bundle(model)))
    if warning:
        print(f"ubc-infer: {warning}", file=sys.stderr)


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
    settings = _pacs_settings(args, parser)
    source: Any = args.input
    try:
        _warn_if_synthetic(args.model)
        outputs = _outputs(args, settings)
        if settings is not None and _is_pacs(args.input):
            from ubc.net import open_source

            source = open_source(args.input, settings)
        summary = run(args.model, source, outputs, backend=args.backend,
                      device=args.device, pattern=args.pattern, limit=args.limit,
                      options=_options(args), progress=not args.quiet, **extra)
    except (PipelineError, OutputFault) as exc:
        print(f"ubc-infer: stopped: {exc}; re-run the same command to resume",
              file=sys.stderr)
        return EXIT_STOPPED
    except (UBCError, ValueError, OSError) as exc:  # raised before any case is scored
        print(f"ubc-infer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ubc-infer: interrupted; re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if not isinstance(source, str):
            source.close()
    if not args.quiet:
        print(summary.format())
    return EXIT_FAILED_CASES if summary.failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
