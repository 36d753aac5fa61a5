"""``ubc-bench``: latency and throughput of every backend of a bundle side by side, with
parity, as a table, JSON and a plot (argument parsing only; the work is ``ubc.benchmark``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ubc.devices import ISA_CAPS
from ubc.errors import UBCError

if TYPE_CHECKING:
    from ubc.bundle import Bundle
from ubc.quiet import configure_logging

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


_EPILOG = """\
every variant x precision x batch size this machine can run is timed; the others are
listed with the reason (a package to install, an artifact to export). Eager PyTorch fp32
on the same device is always timed: every row shows its speed-up over it at the same batch.

timing: warm-up calls excluded, a monotonic clock read after the device is synchronised
(CUDA events too on a GPU), inputs rotated among buffers larger than the CPU cache, the
median and the spread (IQR/median) reported; by default each backend runs in a fresh
process, so no runtime inherits another's threads or memory.

parity: against eager PyTorch fp32 on the CPU, on --parity-slices preprocessed slices of
generated phantom volumes (ubc.parity: max |dP(HGG)|, mask Dice, relative class-logit
error; tolerances by precision).

examples:
  ubc-bench model.ubc                               every backend, batch 1, 8, 32
  ubc-bench model.ubc --backends torch,openvino --batch-sizes 1,16 --json out.json
  ubc-bench model.ubc --quick --plot bench.png      a fast look (fewer, shorter timings)

informational rows, marked (info): variants and precisions that parity does not check and
backend="auto" never picks (ubc.engine.registry: e.g. CUDA graphs, or a precision a runtime
offers but the table does not check); timed and parity-checked, their failures not fatal.

exit codes: 0 done, 1 a variant backend="auto" could pick failed its parity check or
crashed (rows still printed), 2 usage error or unusable bundle.
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...] | None:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    return None if names in ((), ("auto",)) else names


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or HxW, got {text!r}") from None
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected H or HxW, got {text!r}")
    return (values[0], values[-1])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ubc-bench``."""
    from ubc.engine.registry import VARIANTS

    p = argparse.ArgumentParser(
        prog="ubc-bench", description="Latency and throughput of every backend of a UBC "
        "bundle side by side, with parity against eager PyTorch.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="model bundle directory (NAME.ubc)")
    p.add_argument("--backends", type=_names, default=None, metavar="LIST",
                   help=f"auto (default: all) or some of {','.join(VARIANTS)}")
    p.add_argument("--precisions", type=_names, default=None, metavar="LIST",
                   help="auto (default) or some of fp32,fp16,bf16,int8")
    p.add_argument("--batch-sizes", type=_ints, default=(1, 8, 32), metavar="LIST",
                   help="batch sizes in slices (default 1,8,32)")
    p.add_argument("--size", type=_size, metavar="HxW",
                   help="input size; the bundle's (its engines take no other): a check")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--warmup", type=int, default=3, metavar="N",
                   help="untimed calls per batch size (default 3)")
    p.add_argument("--iters", type=int, default=20, metavar="N",
                   help="timed calls per batch size at most (default 20)")
    p.add_argument("--max-seconds", type=float, default=20.0, metavar="S",
                   help="time budget per batch size (default 20; at least 3 calls)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run the backends in turn N times, sharing --iters and "
                   "--max-seconds, and merge (fairer on a machine whose load drifts)")
    p.add_argument("--quick", action="store_true",
                   help="a fast look: --warmup 1 --iters 5 --max-seconds 5, one pipeline case")
    p.add_argument("--threads", type=int, metavar="N",
                   help="intra-op threads of every runtime (default: each runtime's own)")
    p.add_argument("--parity-slices", type=int, default=64, metavar="N",
                   help="slices for the parity check (default 64; 0 skips it)")
    p.add_argument("--max-isa", choices=sorted(ISA_CAPS), metavar="ISA",
                   help="cap the vector instruction set (one of " + ", ".join(sorted(ISA_CAPS))
                   + "): measures an older CPU on this one, e.g. avx2 on an AMX Xeon; "
                   "oneDNN (PyTorch, OpenVINO) honours it, ONNX Runtime does not")
    p.add_argument("--in-process", action="store_true",
                   help="run every backend in this process (faster, less isolated)")
    p.add_argument("--no-preprocess", action="store_true", help="skip the preprocessing rows")
    p.add_argument("--no-peer", action="store_true", help="skip the MONAI peer row")
    p.add_argument("--volume", metavar="NIFTI", help="time preprocessing on this volume "
                   "(default: a generated BraTS-like phantom)")
    p.add_argument("--pipeline-cases", type=int, default=4, metavar="N",
                   help="volumes for the ubc-infer pipeline row (default 4; 0 skips it)")
    p.add_argument("--pipeline-backend", default="auto", metavar="NAME",
                   help="backend of the pipeline row (default auto, as ubc-infer)")
    feed = p.add_argument_group("feed: the CPU side of scoring with a replay engine")
    feed.add_argument("--feed", action="store_true",
                      help="time ubc-infer's whole path with an engine that replays the "
                      "model's recorded outputs (NIfTI, DICOM; rows, masks, SEG; 1 and 2 "
                      "cores) against the read and inflate floors, instead of the backends")
    feed.add_argument("--cases", type=int, default=8, metavar="N",
                      help="phantom volumes per input kind for --feed (default 8)")
    feed.add_argument("--workdir", metavar="DIR",
                      help="where --feed keeps its archives between runs (default: a folder "
                      "in the temp dir)")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the results as JSON")
    out.add_argument("--plot", metavar="FILE.png", help="write throughput/latency plots")
    out.add_argument("--markdown", metavar="FILE", help="write the results as Markdown")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def options_from(args: argparse.Namespace):  # -> BenchOptions (lazy import)
    """``BenchOptions`` from parsed arguments."""
    from ubc.benchmark import BenchOptions

    quick = args.quick
    return BenchOptions(
        variants=args.backends, precisions=args.precisions, batch_sizes=args.batch_sizes,
        device=args.device, warmup=1 if quick else args.warmup,
        iters=5 if quick else args.iters, max_seconds=5.0 if quick else args.max_seconds,
        rounds=args.rounds,
        threads=args.threads, parity_slices=args.parity_slices, isolate=not args.in_process,
        preprocessing=not args.no_preprocess, peer=not args.no_peer,
        pipeline_cases=min(args.pipeline_cases, 1) if quick else args.pipeline_cases,
        pipeline_backend=args.pipeline_backend, volume=args.volume)


def _run(args: argparse.Namespace, command: str) -> int:
    from ubc import benchmark
    from ubc.bundle import Bundle

    bundle = Bundle(args.bundle)
    if args.feed:
        return _feed(args, bundle)
    if args.size is not None and tuple(args.size) != bundle.preprocessing.size:
        have = "x".join(map(str, bundle.preprocessing.size))
        raise ValueError(f"--size {args.size[0]}x{args.size[1]}: {bundle.path} takes "
                         f"{have} (its exported engines have that size built in); benchmark "
                         "another size with a bundle trained at it (ubc-train)")
    options = options_from(args)

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"ubc-bench: {message}", file=sys.stderr, flush=True)

    report = benchmark.run_bench(bundle, options, command=command, progress=progress)
    doc = report.to_json()
    benchmark.print_report(doc)
    if args.json:
        print(f"wrote {benchmark.write_json(doc, args.json)}")
    if args.plot:
        print(f"wrote {benchmark.write_plot(doc, args.plot)}")
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).write_text(benchmark.to_markdown(doc, plot=args.plot))
        print(f"wrote {args.markdown}")
    return EXIT_FAILED if benchmark.fatal(doc) else EXIT_OK


def _feed(args: argparse.Namespace, bundle: Bundle) -> int:
    from pathlib import Path

    from ubc.benchmark import feed

    options = feed.FeedOptions(cases=args.cases, backend=args.pipeline_backend,
                               workdir=Path(args.workdir or feed.FeedOptions.workdir))

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"ubc-bench --feed: {message}", file=sys.stderr, flush=True)

    doc = feed.run_feed(bundle, options, progress)
    feed.print_feed(doc)
    if args.json:
        from ubc.benchmark import write_json

        print(f"wrote {write_json(doc, args.json)}")
    if args.plot:
        print(f"wrote {feed.plot_feed(doc, args.plot)}")
    return EXIT_OK


def cap_isa(isa: str) -> None:
    """Cap the instruction set of this process and the backends' processes it starts; before
    torch or OpenVINO is imported, since both read the cap once."""
    import os

    from ubc.devices import ISA_CAP_ENV

    if "torch" in sys.modules or "openvino" in sys.modules:
        raise ValueError("--max-isa must be applied before torch or OpenVINO is imported")
    os.environ[ISA_CAP_ENV] = os.environ["OV_CPU_MAX_ISA"] = isa.upper()
    os.environ["ATEN_CPU_CAPABILITY"] = ISA_CAPS[isa].aten


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ubc-bench``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.max_isa:
        cap_isa(args.max_isa)
    configure_logging(args.verbose)
    try:
        return _run(args, "ubc-bench " + shlex.join(argv))
    except (UBCError, ValueError, ImportError, FileNotFoundError) as exc:
        print(f"ubc-bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
