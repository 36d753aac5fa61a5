"""``ubc-export``: write TorchScript, ONNX, AOTInductor and TensorRT artifacts into a model
bundle and check each against eager PyTorch (argument parsing only; the work is
``ubc.export`` and ``ubc.parity``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ubc.errors import UBCError

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

exit codes: 0 done (and every check passed), 1 a parity check failed, 2 usage error or
unusable bundle.
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
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def _formats(args: argparse.Namespace) -> list[str]:
    chosen = [f for f in ("torchscript", "onnx", "aoti", "tensorrt") if getattr(args, f)]
    if not chosen and not args.check:
        args.check = True
        return ["torchscript", "onnx"]
    return chosen


def _run(args: argparse.Namespace) -> int:
    import numpy as np

    from ubc.artifacts import ONNX, stale_reason
    from ubc.bundle import Bundle
    from ubc.devices import resolve_device
    from ubc.export import exporter
    from ubc.parity import MIN_SLICES, check_bundle, format_table, slices_from

    bundle = Bundle(args.bundle)
    formats = _formats(args)
    device = resolve_device(args.device)
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
    if not args.check or slices is None:
        return EXIT_OK
    print(f"checking against eager PyTorch fp32 on {source} ...", flush=True)
    results = check_bundle(bundle, slices, device=device, source=source, record=True)
    print(format_table(results))
    failed = [r for r in results if getattr(r, "passed", True) is False]
    return EXIT_PARITY if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ubc-export``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (UBCError, ValueError, ImportError, FileNotFoundError) as exc:
        print(f"ubc-export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
