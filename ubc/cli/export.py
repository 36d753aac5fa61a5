"""``ubc-export``: write TorchScript, ONNX, AOTInductor and TensorRT artifacts into a model
bundle and check each against eager PyTorch (argument parsing only: the formats are
``ubc.artifacts.FORMATS``, the slices come from ``ubc.check_data``, the work is
``ubc.export_job.run_export``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ubc.artifacts import FORMATS
from ubc.errors import UBCError
from ubc.quiet import configure_logging

if TYPE_CHECKING:
    from ubc.bundle import Bundle
    from ubc.export.tensorrt import TensorRTOptions

EXIT_OK, EXIT_PARITY, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
with no format and no --check: --torchscript --onnx --check.

artifacts go into the bundle atomically (a killed export leaves it as it was), each with
its sha256 in meta.json. TensorRT plans and AOTInductor packages are built for the machine
that runs this command and named after it (GPU, compute capability, TensorRT version; CPU
instruction set); build them where they will run.

--check compares every backend this machine can run (CPU: TorchScript, ONNX Runtime,
OpenVINO, AOTInductor; CUDA: TorchScript fp32/fp16, AOTInductor, TensorRT) with eager
PyTorch fp32 on >= 64 preprocessed slices (--slices-from, else synthetic phantoms read back
through ubc.io and ubc.preprocess), prints the table and records it in meta.json.

--cpu writes every CPU artifact this machine can run (TorchScript, ONNX, INT8 OpenVINO IR
and INT8 ONNX Runtime QDQ calibrated on --calib, else on the bundle's training archive when
it still exists, else on phantoms, both with the layer groups OpenVINO's measured choice
keeps in floating point; bf16 needs no file and is checked where the CPU has it
natively), checks each one's slices (--slices-from) and cases (6 phantoms + --held-out),
times the passing ones at the scoring batch size, records it all in meta.json under this
CPU's class, and says what backend='auto' now picks. A bf16 or INT8 artifact below its
gate is recorded as such and never picked by auto. The timing interleaves the artifacts in
rounds (a host whose speed drifts biases none); --retime repeats only that.

exit codes: 0 done (and every check passed, CPU bf16/INT8 gates aside), 1 a parity check
failed, 2 usage error or unusable bundle.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ubc-export``."""
    p = argparse.ArgumentParser(
        prog="ubc-export", description="Export a UBC model bundle for inference and check "
        "every exported form against eager PyTorch.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="model bundle directory (NAME.ubc)")
    formats = p.add_argument_group("formats")
    for fmt in FORMATS.values():
        if fmt.help:
            formats.add_argument(f"--{fmt.name}", action="store_true", help=fmt.help)
    formats.add_argument("--cpu", action="store_true",
                         help="every CPU artifact this machine can run (TorchScript, ONNX, "
                         "INT8 for ONNX Runtime and OpenVINO calibrated on --calib; bf16 "
                         "where native), each gated by parity on --slices-from and the "
                         "--held-out cases and timed; all recorded in meta.json")
    p.add_argument("--held-out", nargs="+", action="append", metavar="DATA",
                   help="with --cpu: cases (an archive folder or NIfTI volumes) whose status "
                   "and class must not change, beside 6 synthetic phantoms; repeat for "
                   "several sets")
    p.add_argument("--timing-seconds", type=float, default=3.0, metavar="S",
                   help="with --cpu: timing per artifact (default 3 s)")
    p.add_argument("--retime", action="store_true",
                   help="with --cpu: only time again what passed its gates (on a new CPU, "
                   "or a quieter moment than the export's), and record it")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16",
                   help="TensorRT plan precision (default fp16)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="largest batch of the TensorRT profile / AOTI package (default 32)")
    p.add_argument("--opt-batch", type=int, metavar="N",
                   help="batch the TensorRT profile is tuned for (default: --max-batch)")
    p.add_argument("--workspace", type=float, default=4.0, metavar="GIB",
                   help="TensorRT builder workspace (default 4 GiB)")
    p.add_argument("--calib", nargs="+", metavar="DATA", help="INT8 calibration data: an "
                   "archive folder, NIfTI volumes or a .npy of preprocessed slices")
    p.add_argument("--calib-slices", type=int, default=256, metavar="N",
                   help="slices drawn for INT8 calibration (default 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (for --aoti, "
                   "--tensorrt and --check)")
    p.add_argument("--check", action="store_true",
                   help="check every runnable backend against eager PyTorch")
    p.add_argument("--slices-from", nargs="+", metavar="PATH",
                   help="parity slices: an archive folder, NIfTI volumes or a .npy")
    p.add_argument("--check-slices", type=int, default=64, metavar="N",
                   help="number of parity slices (>= 64, default 64)")
    p.add_argument("--triton", metavar="REPO_DIR",
                   help="also write a Triton model repository there (the ONNX model, "
                   "exported first if needed, and any TensorRT plans, each with its "
                   "config.pbtxt; max_batch_size from --max-batch)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log what happens, third-party warnings included")
    return p


def _formats(args: argparse.Namespace) -> list[str]:
    chosen = [name for name, fmt in FORMATS.items() if fmt.help and getattr(args, name)]
    if not chosen and not args.check and not getattr(args, "triton", None):
        args.check = True
        return ["torchscript", "onnx"]
    return chosen


def _run(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from ubc.bundle import Bundle
    from ubc.export_job import ExportJob, run_export
    from ubc.parity import fatal_failures, format_table

    bundle = Bundle(args.bundle)
    formats = [] if args.cpu else _formats(args)
    job = ExportJob(formats=tuple(formats), device=args.device, max_batch=args.max_batch,
                    tensorrt=_tensorrt_options(args) if "tensorrt" in formats else None,
                    triton=args.triton, check=args.check, cpu=args.cpu, retime=args.retime,
                    timing_seconds=args.timing_seconds)
    with tempfile.TemporaryDirectory(prefix="ubc-held-out-") as tmp:
        report = run_export(bundle, job, say=lambda line: print(line, flush=True),
                            **_inputs(args, bundle, job.formats_for(bundle), Path(tmp)))
    if report.parity:
        print(format_table(report.parity))
    if report.auto:
        print(f"backend='auto' on this CPU ({report.cpu_class}) now picks {report.auto}")
    return EXIT_PARITY if fatal_failures(report.parity) else EXIT_OK  # CPU bf16/int8: gates


def _inputs(args: argparse.Namespace, bundle: Bundle, formats: list[str],
            tmp: Path) -> dict[str, Any]:
    """The slices and cases the arguments name for ``run_export``: phantoms unless
    --slices-from; the INT8 calibration of --cpu on --calib, else the bundle's training
    archive when it still exists, else phantoms of another seed; 6 held-out phantoms beside
    the --held-out sets."""
    from ubc.check_data import phantom_archive, slices_from
    from ubc.data import CALIBRATION_ENDS
    from ubc.parity import MIN_SLICES, case_volumes

    prep = bundle.preprocessing
    if args.cpu and args.retime:
        return {"slices": slices_from(args.slices_from or [], prep, MIN_SLICES, seed=0)[0]}
    if args.cpu:
        calib, calib_source = slices_from(args.calib or _training_archive(bundle), prep,
                                          args.calib_slices, seed=1,
                                          end_fraction=CALIBRATION_ENDS)
        print(f"INT8 calibration on {calib_source}", flush=True)
        slices, source = slices_from(args.slices_from or [], prep,
                                     max(MIN_SLICES, args.check_slices), seed=0)
        sets = [[str(phantom_archive(tmp, prep))], *(args.held_out or [])]
        return {"slices": slices, "source": source, "calib": calib,
                "held_out": [(" ".join(Path(p).name for p in paths), case_volumes(paths))
                             for paths in sets]}
    inputs: dict[str, Any] = {}
    if args.check or any("example" in FORMATS[f].inputs for f in formats):
        if args.check and args.check_slices < MIN_SLICES:
            raise ValueError(f"--check-slices must be >= {MIN_SLICES}")
        inputs["slices"], inputs["source"] = slices_from(
            args.slices_from or [], prep, args.check_slices if args.check else 2)
    if "tensorrt" in formats and args.precision == "int8" and args.calib:
        inputs["calib"] = slices_from(args.calib, prep, args.calib_slices,
                                      end_fraction=CALIBRATION_ENDS)[0]
    return inputs


def _training_archive(bundle: Bundle) -> list[str]:
    """The archive the bundle was trained on, where it still is (else phantoms calibrate,
    and this says why)."""
    trained_on = str(bundle.meta.get("training", {}).get("data") or "")
    if trained_on and Path(trained_on).is_dir():
        return [trained_on]
    if trained_on:
        print(f"the training archive {trained_on} is not here (give --calib)", flush=True)
    return []


def _tensorrt_options(args: argparse.Namespace) -> TensorRTOptions:
    from ubc.export.tensorrt import TensorRTOptions

    return TensorRTOptions(precision=args.precision, max_batch=args.max_batch,
                           opt_batch=args.opt_batch, workspace_gib=args.workspace,
                           device=args.device)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ubc-export``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.retime and not args.cpu:
        parser.error("--retime goes with --cpu")
    configure_logging(args.verbose)
    try:
        return _run(args)
    except (UBCError, ValueError, ImportError, FileNotFoundError) as exc:
        print(f"ubc-export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
