"""``ubc-serve``: score volumes over HTTP with a model bundle (argument parsing only; the
service is ``ubc.serve``)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ubc.serve import ServeConfig

EXIT_OK, EXIT_USAGE = 0, 2

_EPILOG = """\
endpoints (OpenAPI schema at /openapi.json, interactive docs at /docs):
  POST /v1/predict[?case_id=ID]  body: the .nii/.nii.gz file; JSON: the results-file
                                 columns of ubc-infer + per-slice scores
  POST /v1/mask[?case_id=ID]     the same; answers the lesion mask as .nii.gz in the
                                 input's grid (the row as JSON in the X-UBC-Result header)
  POST /v1/studies[/UID][?seg=true]  body: a DICOM study, STOW-RS style (multipart/related;
                                 type="application/dicom", as dicomweb-client's
                                 store_instances sends it) or a zip; the FLAIR series is
                                 chosen as for files; answers the row as DICOM JSON
                                 (application/json with Accept: application/json), the SEG
                                 too with seg=true
  GET /healthz  /readyz  /metrics  /v1/model
  curl --data-binary @scan.nii.gz http://127.0.0.1:8000/v1/predict?case_id=c1

batching: one engine per process; a batching thread packs the slices of concurrent
requests into engine calls of at most --max-batch slices, waiting at most --max-wait-ms
for a batch to fill. Past --max-queue waiting slices, requests get 503 + Retry-After.

scaling: each process (each of --workers, or each replica behind a load balancer) loads
its own engine and pays its memory: ubc-resnet34 is 98 MB of fp32 weights, and one
ubc-serve process measured 0.96 GB resident with onnxruntime at 64 x 64 under load (the
runtime's arenas grow with --max-batch and the slice size); a GPU engine also holds its
plan and activations in device memory. With --workers, /readyz answers for the worker
that takes the connection. On one accelerator prefer one process with larger batches
(more requests per engine call); on a CPU host, workers share its cores.

limits (every refusal is answered, and the rest of a body still coming after
an early answer is read and discarded, at most 64 MB for 5 s, so that clients that send
their whole body before reading, like Python's urllib, get the answer, not a reset):
  --max-upload-mb      a request body; larger get 413 (from Content-Length, before reading)
  --max-volume-mb      the memory one volume takes to score: its voxels as stored (read from
                       its header before decoding) + 4 bytes per voxel of working memory;
                       larger get 413. 768 MB admits 512 x 512 x 512 at int16
  --decode-budget-mb   all volumes being decoded and scored at once; a request that finds
                       no room waits up to 10 s, then gets 503 + Retry-After
  --header-timeout-s   the request line and headers; then the connection is closed
  --body-timeout-s     grace time for a body, extended 1 s per KB received (a client sending
                       at 1 KB/s or faster is never cut off); then 408
A client that went away before its answer counts as status 499 in /metrics.

SIGTERM: stops accepting, finishes the requests in flight for at most --shutdown-timeout-s
(those still running then are answered 503), exits 0.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ubc-serve``."""
    p = argparse.ArgumentParser(
        prog="ubc-serve", description="Serve a UBC bundle over HTTP, batching the slices of "
        "concurrent requests into engine calls.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="BUNDLE", help="model bundle directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--backend", default="auto", help="engine backend (default auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="slices per engine call (default: the engine's, at most 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="M",
                   help="longest wait for a batch to fill (default 5 ms; 0: never wait)")
    p.add_argument("--max-queue", type=int, default=1024, metavar="Q",
                   help="slices waiting at most; more get 503 (default 1024)")
    p.add_argument("--max-upload-mb", type=float, default=256.0, metavar="U",
                   help="largest request body (default 256 MB); larger get 413")
    p.add_argument("--max-volume-mb", type=float, default=768.0, metavar="V",
                   help="most memory one volume may take to score (default 768 MB: 512^3 "
                   "int16); larger get 413")
    p.add_argument("--decode-budget-mb", type=float, default=1536.0, metavar="B",
                   help="memory all volumes being scored at once may take (default 1536 MB)")
    p.add_argument("--header-timeout-s", type=float, default=10.0, metavar="S",
                   help="time for the request line and headers (default 10 s)")
    p.add_argument("--body-timeout-s", type=float, default=10.0, metavar="S",
                   help="grace time for a request body, + 1 s per KB received (default 10 s)")
    p.add_argument("--shutdown-timeout-s", type=int, default=30, metavar="S",
                   help="after SIGTERM, how long requests in flight may finish (default 30 s)")
    p.add_argument("--token-file", metavar="F",
                   help="require 'Authorization: Bearer <the file's token>' (not on "
                   "/healthz and /readyz)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes, each with its own engine (default 1)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    return p


def _config(args: argparse.Namespace) -> ServeConfig:
    from ubc.bundle import Bundle
    from ubc.provenance import TrainingData, synthetic_warning
    from ubc.serve import ServeConfig

    bundle = Bundle(args.model)  # refuse a missing or broken bundle now, not in a worker
    warning = synthetic_warning(TrainingData.of_bundle(bundle))
    if warning:  # once, here: not in each worker
        print(f"ubc-serve: {warning}", file=sys.stderr)
    for name in ("port", "max_queue", "workers"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    for name in ("max_upload_mb", "max_volume_mb", "decode_budget_mb", "header_timeout_s",
                 "body_timeout_s", "shutdown_timeout_s"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.decode_budget_mb < args.max_volume_mb:
        raise ValueError(f"--decode-budget-mb ({args.decode_budget_mb:g}) must be at least "
                         f"--max-volume-mb ({args.max_volume_mb:g}): a volume at the cap "
                         "would never fit")
    config = ServeConfig(model=str(args.model), backend=args.backend, device=args.device,
                         max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_queue=args.max_queue, max_upload_mb=args.max_upload_mb,
                         token_file=os.path.abspath(args.token_file) if args.token_file
                         else None, max_volume_mb=args.max_volume_mb,
                         decode_budget_mb=args.decode_budget_mb,
                         body_timeout_s=args.body_timeout_s)
    config.read_token()  # an unreadable or empty token file is a usage error
    return config


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """uvicorn drains on SIGTERM, then raises it again; landing here makes that exit 0."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ubc-serve``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        from ubc.errors import UBCError
        from ubc.serve.app import ENV_CONFIG, create_app
        from ubc.serve.protocol import GuardedH11Protocol

        config = _config(args)
    except ImportError as exc:
        print(f"ubc-serve: error: {exc}; install the service with pip install 'ubc[serve]'",
              file=sys.stderr)
        return EXIT_USAGE
    except (UBCError, ValueError, OSError) as exc:
        print(f"ubc-serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    signal.signal(signal.SIGTERM, _on_sigterm)
    # a partial of a module-level class: it pickles into --workers' processes
    http = functools.partial(GuardedH11Protocol, header_timeout_s=args.header_timeout_s)
    options = dict(host=args.host, port=args.port, log_level=args.log_level,
                   access_log=False, server_header=False, http=http,
                   timeout_graceful_shutdown=args.shutdown_timeout_s)
    if args.workers > 1:
        os.environ[ENV_CONFIG] = config.to_json()
        uvicorn.run("ubc.serve.app:app_from_env", factory=True, workers=args.workers,
                    **options)
    else:
        uvicorn.run(create_app(config), **options)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
