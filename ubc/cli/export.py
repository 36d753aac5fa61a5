"""``ubc-export``: write TorchScript, ONNX, AOTInductor and TensorRT artifacts into a model
bundle and check each against eager PyTorch (argument parsing only; the work is
``ubc.export`` and ``ubc.parity``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ubc.errors import UBCError

if TYPE_CHECKING:
    from pathlib import Path

    from ubc.bundle import Bundle, Preprocessing

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

--cpu writes every CPU artifact this machine can run (TorchScript, ONNX, INT8 ONNX Runtime
QDQ and INT8 OpenVINO IR calibrated on --calib, else on the bundle's training archive when
it still exists, else on phantoms; bf16 needs no file and is checked where the CPU has it
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
    formats.add_argument("--torchscript", action="store_true", help="traced, frozen model.ts")
    formats.add_argument("--onnx", action="store_true", help="model.onnx, dynamic batch")
    formats.add_argument("--aoti", action="store_true",
                         help="AOTInductor package for --device (compiles for minutes)")
    formats.add_argument("--tensorrt", action="store_true",
                         help="TensorRT plan for this GPU (exports the ONNX first if needed)")
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
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def _formats(args: argparse.Namespace) -> list[str]:
    chosen = [f for f in ("torchscript", "onnx", "aoti", "tensorrt") if getattr(args, f)]
    if not chosen and not args.check and not getattr(args, "triton", None):
        args.check = True
        return ["torchscript", "onnx"]
    return chosen


def _run_cpu(args: argparse.Namespace) -> int:
    """``--cpu``: ``ubc.export.cpu.export_cpu`` with the calibration, parity and held-out
    data of the arguments (defaults: the bundle's training archive when it still exists,
    else phantoms; phantoms of other seeds for parity and the case gates)."""
    import tempfile
    from pathlib import Path

    from ubc.bundle import Bundle
    from ubc.export.cpu import export_cpu
    from ubc.parity import MIN_SLICES, case_volumes, fatal_failures, format_table, slices_from

    bundle = Bundle(args.bundle)
    if args.retime:
        return _retime(bundle, args)
    prep = bundle.preprocessing
    trained_on = str(bundle.meta.get("training", {}).get("data") or "")
    calib_paths = args.calib or ([trained_on] if trained_on and Path(trained_on).is_dir()
                                 else [])
    calib, calib_source = slices_from(calib_paths, prep, args.calib_slices, seed=1)
    print(f"INT8 calibration on {calib_source}", flush=True)
    slices, source = slices_from(args.slices_from or [], prep,
                                 max(MIN_SLICES, args.check_slices), seed=0)
    with tempfile.TemporaryDirectory(prefix="ubc-held-out-") as tmp:
        sets = [[_phantom_archive(Path(tmp), prep)], *(args.held_out or [])]
        held_out = [(" ".join(Path(p).name for p in paths), case_volumes(paths))
                    for paths in sets]
        report = export_cpu(bundle, calib=calib, slices=slices, source=source,
                            held_out=held_out, seconds=args.timing_seconds,
                            say=lambda line: print(line, flush=True))
    print(format_table(report.parity))
    chosen = _auto_choice(bundle)
    print(f"backend='auto' on this CPU ({report.cpu_class}) now picks {chosen}")
    return EXIT_PARITY if fatal_failures(report.parity) else EXIT_OK


def _retime(bundle: Bundle, args: argparse.Namespace) -> int:
    """``--cpu --retime``: ``ubc.export.cpu.time_passing`` alone (artifacts and gates as
    meta.json records them)."""
    from ubc.devices import cpu_class
    from ubc.export.cpu import CpuExport, scoring_batch, time_passing
    from ubc.parity import MIN_SLICES, slices_from

    slices, _ = slices_from(args.slices_from or [], bundle.preprocessing, MIN_SLICES, seed=0)
    report = CpuExport(cpu_class=cpu_class())
    print(f"timing what passed on this CPU ({report.cpu_class}) ...", flush=True)
    time_passing(bundle, report, slices, scoring_batch(bundle), args.timing_seconds, None,
                 lambda line: print(line, flush=True))
    print(f"backend='auto' on this CPU ({report.cpu_class}) now picks {_auto_choice(bundle)}")
    return EXIT_OK


def _phantom_archive(folder: Path, prep: Preprocessing) -> str:
    """6 synthetic phantoms (seed 2: neither the calibration's nor the parity's) whose
    field of view fits the bundle's (1 mm voxels, 48 axial slices)."""
    from ubc.synth import write_archive

    size, spacing = prep.size, prep.target_spacing
    shape = (int(size[0] * spacing[0]), int(size[1] * spacing[1]), 48)
    return str(write_archive(folder / "held-out", 6, seed=2, shape=shape))


def _auto_choice(bundle: Bundle) -> str:
    from ubc.engine.registry import choose

    choice = choose(bundle, "cpu", "auto")
    return f"{choice.variant} {choice.precision} ({choice.artifact})"


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "cpu", False):
        return _run_cpu(args)
    import numpy as np

    from ubc.artifacts import ONNX, stale_reason
    from ubc.bundle import Bundle
    from ubc.devices import resolve_device
    from ubc.export import exporter
    from ubc.parity import MIN_SLICES, check_bundle, fatal_failures, format_table, slices_from

    bundle = Bundle(args.bundle)
    formats = _formats(args)
    device = resolve_device(args.device)
    if args.triton and "onnx" not in formats and \
            (not bundle.has(ONNX) or stale_reason(bundle, ONNX)):
        formats.insert(0, "onnx")
    if "tensorrt" in formats and "onnx" not in formats and \
            (not bundle.has(ONNX) or stale_reason(bundle, ONNX)):
        formats.insert(formats.index("tensorrt"), "onnx")
    slices, source = None, ""
    if args.check or {"torchscript", "onnx", "aoti"} & set(formats):
        if args.check and args.check_slices < MIN_SLICES:
            raise ValueError(f"--check-slices must be >= {MIN_SLICES}")
        # Traced and checked on preprocessed slices (phantoms unless --slices-from).
        slices, source = slices_from(args.slices_from or [], bundle.preprocessing,
                                     args.check_slices if args.check else 2)
        slices = np.ascontiguousarray(slices, dtype=np.float32)
    for fmt in formats:
        print(f"exporting {fmt} ...", flush=True)
        if fmt == "tensorrt":
            from ubc.export.tensorrt import TensorRTOptions

            options = TensorRTOptions(precision=args.precision, max_batch=args.max_batch,
                                      opt_batch=args.opt_batch, workspace_gib=args.workspace,
                                      device=device)
            calib = None
            if args.precision == "int8" and args.calib:
                calib, _ = slices_from(args.calib, bundle.preprocessing, args.calib_slices)
            result = exporter(fmt)(bundle, options=options, calib=calib)
        elif fmt == "aoti":
            result = exporter(fmt)(bundle, device=device, max_batch=args.max_batch,
                                   example=slices)
        else:
            result = exporter(fmt)(bundle, example=slices)
        size = result.path.stat().st_size / 1e6
        print(f"  wrote {result.path} ({size:.1f} MB, {result.seconds:.1f} s)")
    if args.triton:
        from ubc.export.triton import to_triton

        for folder in to_triton(bundle, args.triton, max_batch=args.max_batch):
            print(f"  wrote Triton model {folder}")
    if not args.check or slices is None:
        return EXIT_OK
    print(f"checking against eager PyTorch fp32 on {source} ...", flush=True)
    results = check_bundle(bundle, slices, device=device, source=source, record=True)
    print(format_table(results))
    return EXIT_PARITY if fatal_failures(results) else EXIT_OK  # CPU bf16/int8: gates


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ubc-export``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.retime and not args.cpu:
        parser.error("--retime goes with --cpu")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (UBCError, ValueError, ImportError, FileNotFoundError) as exc:
        print(f"ubc-export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
