"""The ``ubc-serve`` ASGI app (FastAPI): one process holds one ``Predictor``, whose batching
thread packs the slices of concurrent requests into engine batches.

Endpoints (the OpenAPI schema at ``/openapi.json`` documents each):
- ``POST /v1/predict?case_id=ID``: the body is the volume file itself (.nii or .nii.gz,
  recognised by content); JSON with the results file's columns and per-slice scores.
- ``POST /v1/mask?case_id=ID``: the same scoring; the body of the answer is the predicted
  lesion mask as a .nii.gz in the input's grid, orientation and affine (uint8 0/1), the
  row as compact JSON in the ``X-UBC-Result`` header.
- ``POST /v1/studies[/{study}]?seg=true&series_select=...&case_id=ID``: a DICOM study, as a
  STOW-RS request (``multipart/related; type="application/dicom"``, what ``dicomweb-client``
  posts to ``{url}/studies``) or a zip; its series chosen as for files; the answer is the
  row with the study's columns, as DICOM JSON (what a STOW-RS client parses) or, for
  ``Accept: application/json``, as plain JSON; ``seg=true`` adds the DICOM SEG
  (``ubc.serve.dicom_upload``). 415 for another content type.
- ``GET /healthz`` (process alive), ``GET /readyz`` (engine loaded and warmed up),
  ``GET /metrics`` (Prometheus), ``GET /v1/model`` (the bundle's public description).
Errors are JSON ``{"detail": message}``: 400 empty body, 401 missing or wrong bearer token
(with a token file; /healthz and /readyz stay open for probes), 408 a body that did not
arrive in time, 413 upload over the limit (from Content-Length before reading, else counted
while streaming) or a volume whose header declares more than the per-request memory cap
(read before decoding), 422 a body the loader refuses (its message), 503 while loading, when
the queue is full, when the decode budget stays full, or at shutdown (with Retry-After). No
stack trace ever reaches a client; no case id or file content is logged. A client that went
away before its answer is counted as status 499 in /metrics, not as a server error. The
connection-level limits (header timeout, draining a body after an early answer) are
``ubc.serve.protocol``'s.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import os
import tempfile
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, create_model
from starlette.requests import ClientDisconnect

from ubc.errors import UBCInputError
from ubc.io.dicom_select import SeriesSelector
from ubc.scoring.discover import Case
from ubc.scoring.prediction import Prediction
from ubc.scoring.predictor import Overloaded, Predictor
from ubc.scoring.result import COLUMN_TYPES, SERVED_COLUMNS
from ubc.serve.budget import DecodeBudget
from ubc.serve.dicom_upload import (
    StudyReader,
    Unsupported,
    body_kind,
    dicom_json,
    receive_study,
    remove_folder,
    scrub,
    seg_bytes,
)
from ubc.serve.metrics import Metrics
from ubc.serve.upload import TooLarge, TooSlow, check_length, decode_cost, read_body

__all__ = ["ServeConfig", "create_app", "app_from_env", "ENV_CONFIG"]

log = logging.getLogger("ubc.serve")
ENV_CONFIG = "UBC_SERVE_CONFIG"
_MB = 1024 * 1024
RETRY_AFTER_S = 1
BUDGET_WAIT_S = 10.0  # how long a request waits for room in the decode budget, then 503
CLIENT_CLOSED = 499  # the status /metrics counts for a client that went away (nginx's)


@dataclass(frozen=True)
class ServeConfig:
    """What one ``ubc-serve`` process runs: the bundle, its engine and batching knobs (see
    ``Predictor``), the upload limit in MB, an optional file holding the bearer token, and
    the memory limits of decoding (issue 26): ``max_volume_mb`` per request (a volume's
    voxels as stored + 4 bytes per voxel of working memory, read from its header before it
    is decoded; 768 admits 512 x 512 x 512 at int16), ``decode_budget_mb`` for all requests
    of the process at once, and ``body_timeout_s``, the grace time of a request body (see
    ``ubc.serve.upload.read_body``)."""

    model: str
    backend: str = "auto"
    device: str = "auto"
    max_batch: int | None = None
    max_wait_ms: float = 5.0
    max_queue: int = 1024
    max_upload_mb: float = 256.0
    token_file: str | None = None
    max_volume_mb: float = 768.0
    decode_budget_mb: float = 1536.0
    body_timeout_s: float = 10.0

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

#: the row's columns that describe a DICOM source, in the answers of /v1/studies
STUDY_COLUMNS = ("study_uid", "series_uid", "series_description", "flags")
_STUDY_FIELDS: dict[str, Any] = {**_FIELDS, **{c: (COLUMN_TYPES[c], ...) for c in STUDY_COLUMNS},
                                 "seg": (str | None, None)}
StudyResponse = create_model(
    "StudyResponse", **_STUDY_FIELDS,
    __doc__="The row of the study's chosen series (the columns of ``ubc-infer``'s output "
            "with the study, the series chosen and the flags that say how), per-slice "
            "scores, and with ``seg=true`` the DICOM SEG (Part 10 bytes, base64).")


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
        self.budget = DecodeBudget(int(config.decode_budget_mb * _MB), BUDGET_WAIT_S)
        self.metrics = Metrics(lambda: self.predictor.stats() if self.predictor else None,
                               decoding=lambda: self.budget.in_use)
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
        # the scheme is case-insensitive (RFC 7235 section 2.1), the token is not
        scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
        if not (scheme.lower() == "bearer"
                and hmac.compare_digest(credentials.strip().encode(), self.token)):
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
        body = await read_body(request.stream(), limit, self.config.body_timeout_s)
        if not body:
            raise _Refused(400, "empty body: send the .nii or .nii.gz file as the body")
        # what the volume will take is read from its header and reserved before it is
        # decoded; the loader then inflates exactly the declared bytes (+ a margin), in
        # bounded steps: a gzip bomb costs what its header declares, within the caps
        cost = await asyncio.to_thread(decode_cost, body, int(self.config.max_volume_mb * _MB))
        async with self.budget.reserve(cost):
            try:
                return await predictor.predict_async(body, case_id=case_id, mask=mask)
            except Exception as exc:
                _clear_frames(exc)  # free what a failed load held while still in the budget
                raise

    async def score_study(self, request: Request, *, case_id: str | None,
                          study_uid: str | None, selector: SeriesSelector | None,
                          seg: bool) -> tuple[Prediction, bytes | None]:
        """Score the DICOM study of a STOW-RS body or a zip (``ubc.serve.dicom_upload``),
        with the limits of ``predict``: its instances go into a folder of the request's own
        (removed after), its series is chosen as for files and its decode cost read from
        its headers. Returns the prediction and, with ``seg``, the SEG's bytes."""
        self.authorize(request)
        predictor = self.ready()
        kind, boundary = body_kind(request.headers.get("content-type"))  # 415 before reading
        predictor.check_room()
        limit = int(self.config.max_upload_mb * _MB)
        check_length(request.headers.get("content-length"), limit)
        body = await read_body(request.stream(), limit, self.config.body_timeout_s)
        if not body:
            raise _Refused(400, "empty body: send the study's instances (STOW-RS) or a zip")
        folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="ubc-serve-"))
        try:
            study, cost = await asyncio.to_thread(
                receive_study, body, kind, boundary, folder, selector, limit,
                int(self.config.max_volume_mb * _MB))
            del body  # written to files: not held while the series is decoded
            if study_uid is not None and study.study_uid != study_uid:
                raise UBCInputError(f"the body holds study {study.study_uid}, not {study_uid} "
                                    "(the study of the URL)")
            reader = StudyReader(study)
            case = Case(case_id or study.study_uid, folder, reader=reader)
            async with self.budget.reserve(cost):
                try:
                    prediction = await predictor.predict_async(case, mask=seg)
                    seg_file = await asyncio.to_thread(
                        seg_bytes, prediction, reader, folder, predictor.context) \
                        if seg else None
                except Exception as exc:
                    _clear_frames(exc)
                    raise
            return prediction, seg_file
        except UBCInputError as exc:  # messages name the upload, not this server's folder
            raise UBCInputError(scrub(str(exc), folder)) from None
        except TooLarge as exc:
            raise TooLarge(scrub(str(exc), folder)) from None
        finally:
            await asyncio.shield(asyncio.to_thread(remove_folder, folder))

    def model_info(self) -> dict[str, Any]:
        predictor = self.ready()
        meta, engine = predictor.bundle.meta, predictor.engine
        public = ("name", "arch", "format_version", "preprocessing", "class_names", "top_k",
                  "parity")
        return {**{k: meta.get(k) for k in public},
                "weights_sha256": predictor.bundle.weights_sha256,
                "trained_on": predictor.context.trained_on,
                "training_data": (predictor.context.training.to_json()
                                  if predictor.context.training else None),
                "artifacts": sorted(meta.get("files", {})),
                "engine": {"backend": engine.backend, "device": engine.device,
                           "precision": engine.precision, "artifact": engine.artifact},
                "batching": {"max_batch": predictor.max_batch,
                             "max_wait_ms": predictor.max_wait_ms,
                             "max_queue": predictor.max_queue}}


def _clear_frames(exc: BaseException) -> None:
    """Clear the local variables of the finished frames that ``exc`` (and its causes)
    carry: a loader that refused a gzip bomb after inflating its declared size held that
    buffer through its frame's locals for as long as the exception lived, past the end of
    the budget reservation (the budget then admitted more than it counted)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # skips frames still running
        todo += [error.__cause__, error.__context__]


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
    except Unsupported as exc:
        response = _problem(415, str(exc))
    except TooSlow as exc:
        response = _problem(408, str(exc), {"Connection": "close"})
    except ClientDisconnect:
        log.debug("ubc-serve: %s: the client went away before its answer", endpoint)
        response = _problem(CLIENT_CLOSED, "the client went away")  # never delivered
    except asyncio.CancelledError:
        # uvicorn cancels what still runs when the shutdown timeout is spent: an answer the
        # client can act on, instead of uvicorn's 500 and a traceback in the log
        response = _problem(503, "the server is shutting down",
                            {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
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
    408: {"model": Problem, "description": "the body did not arrive in time"},
    413: {"model": Problem, "description": "upload over --max-upload-mb, or a volume over "
          "--max-volume-mb"},
    422: {"model": Problem, "description": "the body is not a readable volume"},
    500: {"model": Problem, "description": "internal error (no details are sent)"},
    503: {"model": Problem, "description": "loading, the queue or the decode budget is "
          "full, or shutting down (Retry-After)"},
}
_VOLUME_BODY = {"requestBody": {"required": True, "description": "the volume file itself "
                "(.nii or .nii.gz, recognised by content)", "content": {
                    "application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}}}}
_CASE_ID = Query(None, max_length=256, description="the case id of the row (default "
                 "'<in memory>'); never logged")
_STUDY_ERRORS = {**_ERRORS, 413: {"model": Problem, "description": "upload (or a zip's "
                 "contents) over --max-upload-mb, or a series whose headers declare more "
                 "than --max-volume-mb"},
                 415: {"model": Problem, "description": "not a STOW-RS body of "
                       "application/dicom parts, nor a zip"},
                 422: {"model": Problem, "description": "a part or file that is not a "
                       "readable DICOM instance, more than one study, or no series to "
                       "score (the message says which and why)"}}
_STUDY_BODY = {"requestBody": {"required": True, "description": "the study's instances: a "
               "STOW-RS body (one Part 10 instance per part) or a zip of them", "content": {
                   "multipart/related": {"schema": {"type": "string", "format": "binary"}},
                   "application/zip": {"schema": {"type": "string", "format": "binary"}}}}}
_STUDY_ANSWER: dict[int | str, dict[str, Any]] = {200: {
    "description": "the row, as DICOM JSON (the row's JSON text in private attribute "
    "(0011,1001) of creator 'UBC 1', the SEG in (0011,1002)) or, for Accept: "
    "application/json, as plain JSON",
    "content": {"application/dicom+json": {"schema": {"type": "object"}}}}}
_STUDY_CASE_ID = Query(None, max_length=256, description="the case id of the row (default: "
                       "the StudyInstanceUID, as ubc-infer's); never logged")
_SEG = Query(False, description="also answer the DICOM SEG of the predicted lesion mask, "
             "referencing the chosen series")
_SERIES_SELECT = Query(None, max_length=512, description="which series to score, as "
                       "ubc-infer --series-select (default: the FLAIR rules)")


def _selector(text: str | None) -> SeriesSelector | None:
    try:
        return None if text is None else SeriesSelector.parse(text)
    except ValueError as exc:
        raise _Refused(422, str(exc).replace("--series-select", "series_select")) from None


def _study_answer(request: Request, prediction: Prediction, seg: bytes | None) -> Response:
    """DICOM JSON, what a STOW-RS client parses (``dicomweb-client`` turns any JSON answer
    into a dataset), unless the client asks for plain JSON."""
    row = prediction.to_row()
    answer = StudyResponse.model_validate(
        {**_row(prediction), **{c: row[c] for c in STUDY_COLUMNS},
         "slices": prediction.slice_scores()}).model_dump(mode="json", exclude={"seg"})
    accept = request.headers.get("accept", "")
    if "application/json" in accept and "application/dicom+json" not in accept:
        encoded = None if seg is None else base64.b64encode(seg).decode("ascii")
        return JSONResponse({**answer, "seg": encoded})
    return JSONResponse(dicom_json(answer, seg), media_type="application/dicom+json")


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

    async def studies(request: Request, study_uid: str | None, case_id: str | None,
                      seg: bool, series_select: str | None) -> Response:
        async def work() -> Response:
            selector = _selector(series_select)
            prediction, seg_file = await service.score_study(
                request, case_id=case_id, study_uid=study_uid, selector=selector, seg=seg)
            return _study_answer(request, prediction, seg_file)
        return await _answer(service, "studies", work)

    @app.post("/v1/studies", summary="score the FLAIR series of one DICOM study (STOW-RS)",
              response_model=StudyResponse, responses={**_STUDY_ERRORS, **_STUDY_ANSWER},
              openapi_extra=_STUDY_BODY)
    async def store_study(request: Request, case_id: str | None = _STUDY_CASE_ID,
                          seg: bool = _SEG, series_select: str | None = _SERIES_SELECT
                          ) -> Response:
        return await studies(request, None, case_id, seg, series_select)

    @app.post("/v1/studies/{study}", summary="score the FLAIR series of the DICOM study "
              "'study' (STOW-RS)", response_model=StudyResponse,
              responses={**_STUDY_ERRORS, **_STUDY_ANSWER}, openapi_extra=_STUDY_BODY)
    async def store_study_instances(request: Request, study: str,
                                    case_id: str | None = _STUDY_CASE_ID, seg: bool = _SEG,
                                    series_select: str | None = _SERIES_SELECT) -> Response:
        return await studies(request, study, case_id, seg, series_select)

    return app


def app_from_env() -> FastAPI:
    """The app of the ``ServeConfig`` in ``$UBC_SERVE_CONFIG`` (JSON): the factory that
    uvicorn's worker processes import (``ubc-serve --workers N``)."""
    text = os.environ.get(ENV_CONFIG)
    if not text:
        raise RuntimeError(f"${ENV_CONFIG} is not set (it is set by ubc-serve)")
    return create_app(ServeConfig.from_json(text))
