"""The ``ubc-serve`` ASGI app (FastAPI): one process holds one ``Predictor``, whose batching
thread packs the slices of concurrent requests into engine batches.

Endpoints (the OpenAPI schema at ``/openapi.json`` documents each):
- ``POST /v1/predict?case_id=ID``: the body is the volume file itself (.nii or .nii.gz,
  recognised by content); JSON with the results file's columns and per-slice scores.
- ``POST /v1/mask?case_id=ID``: the same scoring; the body of the answer is the predicted
  lesion mask as a .nii.gz in the input's grid, orientation and affine (uint8 0/1), the
  row as compact JSON in the ``X-UBC-Result`` header.
- ``GET /healthz`` (process alive), ``GET /readyz`` (engine loaded and warmed up),
  ``GET /metrics`` (Prometheus), ``GET /v1/model`` (the bundle's public description).
Errors are JSON ``{"detail": message}``: 400 empty body, 401 missing or wrong bearer token
(with a token file; /healthz and /readyz stay open for probes), 413 upload over the limit
(from Content-Length before reading, else counted while streaming), 422 a body the loader
refuses (its message), 503 while loading or when the queue is full (with Retry-After). No
stack trace ever reaches a client; no case id or file content is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, create_model

from ubc.errors import UBCInputError
from ubc.scoring.prediction import Prediction
from ubc.scoring.predictor import Overloaded, Predictor
from ubc.scoring.result import COLUMN_TYPES, SERVED_COLUMNS
from ubc.serve.metrics import Metrics
from ubc.serve.upload import TooLarge, check_length, read_body

__all__ = ["ServeConfig", "create_app", "app_from_env", "ENV_CONFIG"]

log = logging.getLogger("ubc.serve")
ENV_CONFIG = "UBC_SERVE_CONFIG"
_MB = 1024 * 1024
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServeConfig:
    """What one ``ubc-serve`` process runs: the bundle, its engine and batching knobs (see
    ``Predictor``), the upload limit in MB and an optional file holding the bearer token."""

    model: str
    backend: str = "auto"
    device: str = "auto"
    max_batch: int | None = None
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_upload_mb: float = 256.0
    token_file: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        return cls(**json.loads(text))

    def read_token(self) -> bytes | None:
        """The bearer token (the file's first line), None without a token file."""
        if self.token_file is None:
            return None
        token = Path(self.token_file).read_text().strip()
        if not token:
            raise ValueError(f"{self.token_file}: the token file is empty")
        return token.encode()


class SliceScores(BaseModel):
    """Per scored slice (axial index of the canonical RAS volume): predicted lesion area on
    the model grid (mm2) and P(HGG)."""

    index: list[int]
    lesion_area_mm2: list[float]
    p_hgg: list[float]


_FIELDS: dict[str, Any] = {**{c: (COLUMN_TYPES[c], ...) for c in SERVED_COLUMNS},
                           "slices": (SliceScores, ...)}
PredictResponse = create_model(
    "PredictResponse", **_FIELDS,
    __doc__="One results-file row (the columns of ``ubc-infer``'s output) plus per-slice "
            "scores.")


class Problem(BaseModel):
    """Why a request was refused."""

    detail: str


class _Refused(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


class _Service:
    """The app's state: the predictor (None until loaded and warmed up), the metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.token = config.read_token()
        self.predictor: Predictor | None = None
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: self.predictor.stats() if self.predictor else None)
        self._loader = threading.Thread(target=self._load, name="ubc-serve-load", daemon=True)

    def _load(self) -> None:
        c = self.config
        try:
            predictor = Predictor(c.model, backend=c.backend, device=c.device,
                                  max_batch=c.max_batch, max_wait_ms=c.max_wait_ms,
                                  max_queue=c.max_queue)
            predictor.warm_up()
        except Exception as exc:  # reported by /readyz; the process stays up to say so
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("ubc-serve: the model could not be loaded: %s", self.load_error)
            return
        self.predictor = predictor
        log.info("ubc-serve: ready (%s %s, max_batch %d)", predictor.engine.backend,
                 predictor.engine.precision, predictor.max_batch)

    def start(self) -> None:
        self._loader.start()

    def stop(self) -> None:
        self._loader.join()
        if self.predictor is not None:
            self.predictor.close()  # runs what is still queued

    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, b"Bearer " + self.token):
            raise _Refused(401, "missing or wrong bearer token",
                           {"WWW-Authenticate": "Bearer"})

    def ready(self) -> Predictor:
        if self.predictor is None:
            detail = f"the model failed to load ({self.load_error})" if self.load_error \
                else "the model is still loading"
            raise _Refused(503, detail, {"Retry-After": str(RETRY_AFTER_S)})
        return self.predictor

    async def predict(self, request: Request, case_id: str | None, mask: bool) -> Prediction:
        self.authorize(request)
        predictor = self.ready()
        predictor.check_room()  # 503 before reading the body
        limit = int(self.config.max_upload_mb * _MB)
        check_length(request.headers.get("content-length"), limit)
        body = await read_body(request.stream(), limit)
        if not body:
            raise _Refused(400, "empty body: send the .nii or .nii.gz file as the body")
        # the loader caps what a .nii.gz may inflate to (its header's size, ubc.io's voxel
        # cap) before allocating: a gzip bomb costs nothing
        return await predictor.predict_async(body, case_id=case_id, mask=mask)

    def model_info(self) -> dict[str, Any]:
        predictor = self.ready()
        meta, engine = predictor.bundle.meta, predictor.engine
        public = ("name", "arch", "format_version", "preprocessing", "class_names", "top_k",
                  "parity")
        return {**{k: meta.get(k) for k in public},
                "weights_sha256": predictor.bundle.weights_sha256,
                "artifacts": sorted(meta.get("files", {})),
                "engine": {"backend": engine.backend, "device": engine.device,
                           "precision": engine.precision, "artifact": engine.artifact},
                "batching": {"max_batch": predictor.max_batch,
                             "max_wait_ms": predictor.max_wait_ms,
                             "max_queue": predictor.max_queue}}


def _row(prediction: Prediction) -> dict[str, Any]:
    row = prediction.to_row()
    return {k: row[k] for k in SERVED_COLUMNS}


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _answer(service: _Service, endpoint: str,
                  work: Callable[[], Awaitable[Response]]) -> Response:
    """Run an endpoint's work; every failure becomes a JSON problem, counted."""
    start = time.perf_counter()
    try:
        response = await work()
    except _Refused as exc:
        response = _problem(exc.status, exc.detail, exc.headers)
    except TooLarge as exc:
        response = _problem(413, str(exc))
    except UBCInputError as exc:
        response = _problem(422, str(exc))
    except Overloaded as exc:
        response = _problem(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)})
    except Exception as exc:  # the engine's fault or a bug; messages may hold a case id,
        # so the log and the client get the type and where, never the message or a trace
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        frame = f"{where.tb_frame.f_code.co_filename}:{where.tb_lineno}" if where else "?"
        log.error("ubc-serve: %s failed (%s at %s)", endpoint, type(exc).__name__, frame)
        response = _problem(500, f"internal error ({type(exc).__name__})")
    service.metrics.observe(endpoint, response.status_code, time.perf_counter() - start)
    return response


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "empty body"},
    401: {"model": Problem, "description": "missing or wrong bearer token"},
    413: {"model": Problem, "description": "upload over --max-upload-mb"},
    422: {"model": Problem, "description": "the body is not a readable volume"},
    500: {"model": Problem, "description": "internal error (no details are sent)"},
    503: {"model": Problem, "description": "loading, or the queue is full (Retry-After)"},
}
_VOLUME_BODY = {"requestBody": {"required": True, "description": "the volume file itself "
                "(.nii or .nii.gz, recognised by content)", "content": {
                    "application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}}}
_CASE_ID = Query(None, max_length=256, description="the case id of the row (default "
                 "'<in memory>'); never logged")


def create_app(config: ServeConfig) -> FastAPI:
    """The ASGI app for ``config``; the model loads in a thread when the app starts
    (``/readyz`` says when it is ready)."""
    service = _Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="ubc-serve", version="1", lifespan=lifespan,
                  description=(__doc__ or "").split("\n\n")[0])
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()]
        return _problem(422, "; ".join(parts) or "invalid request")

    @app.get("/healthz", summary="the process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="the engine is loaded and warmed up",
             responses={503: {"model": Problem}})
    async def readyz() -> Response:
        try:
            service.ready()
        except _Refused as exc:
            return _problem(exc.status, exc.detail, exc.headers)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
             responses={401: {"model": Problem}})
    async def metrics(request: Request) -> Response:
        async def work() -> Response:
            service.authorize(request)
            return Response(service.metrics.render(),
                            media_type="text/plain; version=0.0.4; charset=utf-8")
        return await _answer(service, "metrics", work)

    @app.get("/v1/model", summary="the bundle's public description and the engine in use",
             responses={401: _ERRORS[401], 503: _ERRORS[503]})
    async def model(request: Request) -> Response:
        async def work() -> Response:
            service.authorize(request)
            return JSONResponse(service.model_info())
        return await _answer(service, "model", work)

    @app.post("/v1/predict", summary="score one volume", response_model=PredictResponse,
              responses=_ERRORS, openapi_extra=_VOLUME_BODY)
    async def predict(request: Request, case_id: str | None = _CASE_ID) -> Response:
        async def work() -> Response:
            prediction = await service.predict(request, case_id, mask=False)
            answer = PredictResponse.model_validate(
                {**_row(prediction), "slices": prediction.slice_scores()})
            return JSONResponse(answer.model_dump(mode="json"))
        return await _answer(service, "predict", work)

    @app.post("/v1/mask", summary="score one volume, answer its lesion mask as .nii.gz",
              response_class=Response, openapi_extra=_VOLUME_BODY, responses={
                  200: {"content": {"application/gzip": {"schema": {
                      "type": "string", "format": "binary"}}},
                      "description": "the mask (.nii.gz, uint8 0/1, the input's grid and "
                      "affine); the row as JSON in the X-UBC-Result header"}, **_ERRORS})
    async def mask(request: Request, case_id: str | None = _CASE_ID) -> Response:
        async def work() -> Response:
            prediction = await service.predict(request, case_id, mask=True)
            body = await asyncio.to_thread(prediction.mask_nifti)
            header = json.dumps(_row(prediction), separators=(",", ":"), ensure_ascii=True)
            return Response(body, media_type="application/gzip",
                            headers={"X-UBC-Result": header})
        return await _answer(service, "mask", work)

    return app


def app_from_env() -> FastAPI:
    """The app of the ``ServeConfig`` in ``$UBC_SERVE_CONFIG`` (JSON): the factory that
    uvicorn's worker processes import (``ubc-serve --workers N``)."""
    text = os.environ.get(ENV_CONFIG)
    if not text:
        raise RuntimeError(f"${ENV_CONFIG} is not set (it is set by ubc-serve)")
    return create_app(ServeConfig.from_json(text))
