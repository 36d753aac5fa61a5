"""``ubc-listen``: a DICOM node that scores the studies sent to it and sends the SEG on
(argument parsing only; the node is ``ubc.net.listen``)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ubc.errors import UBCError

if TYPE_CHECKING:
    from ubc.net.listen import ListenSettings
    from ubc.scoring import OutputSpec

EXIT_OK, EXIT_USAGE = 0, 2

_EPILOG = """\
what it does:
  answers C-ECHO; takes C-STORE of image storage SOP classes (MR, Enhanced MR, CT ...;
  SR, SEG and other non-image objects are acknowledged and not kept); each instance is
  written to --spool and fsync'ed before the success status is answered. A study is
  complete when none of its instances arrived for --study-timeout seconds; it is then
  scored exactly as ubc-infer scores a DICOM study (same series choice, flags, rows), its
  row appended to --out, its SEG written to --dicom-seg and sent by C-STORE to --forward
  (with retries; the row's seg_stored says what was stored where). A study that holds no
  MR FLAIR (a CT routed here by mistake) is an error row saying what arrived.

  Exactly once across crashes: restart with the same arguments; a spooled study without
  a row is scored, one whose forward failed is sent again (also every --retry-every
  seconds while running), an instance of a study already scored is acknowledged and
  dropped. SIGTERM (or Ctrl-C) stops listening, finishes the studies being scored and
  leaves the others spooled for the next start; exit 0.

status answered to a C-STORE:
  0x0000 kept (or acknowledged and not kept); 0xA700 out of resources: the spool is at
  --spool-max-gb (nothing already received is dropped); 0xC210 the dataset cannot be
  decoded, lacks its Study/Series/SOP Instance UID or its pixel data is cut short.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ubc-listen``."""
    from ubc.scoring.aggregate import DEFAULT_MIN_LESION_ML

    p = argparse.ArgumentParser(
        prog="ubc-listen", description="A DICOM node: score every MR study sent to it "
        "(C-STORE) with a UBC bundle and send the DICOM SEG on.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="BUNDLE", help="model bundle directory")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="results file (.csv, .jsonl or .parquet), one row per study")
    p.add_argument("--spool", required=True, metavar="DIR",
                   help="where received studies wait until scored")
    p.add_argument("--ae-title", default="UBC", metavar="AET", help="our AE title (default: "
                   "UBC)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                   "127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default: 11112)")
    p.add_argument("--allow", nargs="+", action="extend", metavar="AET",
                   help="the calling AE titles accepted (others are rejected at "
                   "association; default: any)")
    p.add_argument("--forward", metavar="AET@HOST:PORT",
                   help="send each SEG here by C-STORE (the PACS)")
    p.add_argument("--study-timeout", type=float, default=30.0, metavar="S",
                   help="a study is complete when no instance arrived for S seconds "
                   "(default: 30)")
    p.add_argument("--spool-max-gb", type=float, default=10.0, metavar="GB",
                   help="refuse instances (out of resources) past this (default: 10)")
    p.add_argument("--dicom-seg", metavar="DIR", help="where the SEGs are written (default: "
                   "OUT-stem_seg/ beside --out)")
    p.add_argument("--masks", metavar="DIR", help="also write each mask as NIfTI here")
    p.add_argument("--report", metavar="FILE", help="keep one HTML page of all rows")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="network time-out: association, each message, silence (default: 30)")
    p.add_argument("--max-pdu", type=int, default=262144, metavar="BYTES",
                   help="largest PDU accepted (default: 262144)")
    p.add_argument("--retries", type=int, default=3, metavar="N",
                   help="forward tries after a failure, with backoff (default: 3)")
    p.add_argument("--retry-every", type=float, default=300.0, metavar="S",
                   help="send failed forwards again every S seconds (default: 300; 0: only "
                   "at start)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on this port (same --host)")
    p.add_argument("--backend", default="auto", help="as ubc-infer (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, metavar="N", help="slices per engine call")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="loader threads")
    p.add_argument("--series-select", metavar="RULE", help="as ubc-infer")
    p.add_argument("--top-k", type=int, metavar="K", help="slices averaged (default: "
                   "bundle's)")
    p.add_argument("--min-lesion-ml", type=float, default=DEFAULT_MIN_LESION_ML, metavar="ML")
    p.add_argument("-v", "--verbose", action="store_true", help="third-party log lines too")
    return p


def _settings(args: argparse.Namespace) -> ListenSettings:
    from ubc.net.listen import ListenSettings, parse_forward

    return ListenSettings(
        spool=Path(args.spool), ae_title=args.ae_title, host=args.host, port=args.port,
        allow=tuple(args.allow) if args.allow else None,
        study_timeout_s=args.study_timeout, spool_max_bytes=int(args.spool_max_gb * 1e9),
        timeout_s=args.timeout, max_pdu=args.max_pdu,
        forward=None if args.forward is None else parse_forward(args.forward),
        retries=args.retries, retry_every_s=args.retry_every,
        metrics_port=args.metrics_port)


def _outputs(args: argparse.Namespace, settings: ListenSettings) -> OutputSpec:
    import dataclasses

    from ubc.scoring import OutputSpec

    out = Path(args.out)
    dicom_seg = args.dicom_seg or out.with_name(f"{out.stem}_seg")
    spec = OutputSpec.of(out, masks=args.masks, dicom_seg=dicom_seg, report=args.report)
    return dataclasses.replace(spec, store_seg=settings.store())


def _stop_event() -> threading.Event:
    """Set by SIGTERM or SIGINT."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ubc-listen`` until SIGTERM; returns the exit code."""
    args = build_parser().parse_args(argv)
    import logging

    from ubc.quiet import configure_logging

    configure_logging(args.verbose)
    logging.getLogger("ubc.net.listen").setLevel(logging.INFO)
    stop = _stop_event()
    try:
        from ubc import engine as engines
        from ubc.bundle import Bundle
        from ubc.net.listen import run_node
        from ubc.scoring import ScoringOptions
        from ubc.scoring.writers import open_results

        settings = _settings(args)
        outputs = _outputs(args, settings)
        outputs.create()
        bundle = Bundle(args.model)
        rows = open_results(args.out).read()
        if any(r.bundle_sha256 not in (None, bundle.weights_sha256) for r in rows):
            raise UBCError(f"--out {args.out} holds rows of another model; choose another "
                           "--out")
        options = ScoringOptions(batch_size=args.batch_size, workers=args.workers,
                                 top_k=args.top_k, min_lesion_ml=args.min_lesion_ml,
                                 series_select=args.series_select)
        engine = engines.load(bundle, backend=args.backend, device=args.device)
    except (UBCError, ValueError, OSError, ImportError) as exc:
        print(f"ubc-listen: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run_node(settings, bundle, engine, outputs, options, rows, until=stop.wait)
    except OSError as exc:  # the port is taken, the spool not writable
        print(f"ubc-listen: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        engine.close()
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
