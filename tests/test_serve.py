"""ubc-serve end to end over loopback: the real process on a free port, real files posted,
answers compared with ubc-infer's rows (``score_archive``) on the same files; limits (413),
auth (401), bad bodies (400/422, never 500), overload (503 + Retry-After), SIGTERM with
requests in flight; and the service's own OpenAPI schema exercised by schemathesis."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from scoring_archive import TINY_SIZE, TINY_SPACING

from ubc.scoring import discover_cases, read_results, safe_name, score_archive

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
_COLUMNS = ("case_id", "status", "error", "p_hgg", "predicted_class", "lesion_volume_ml",
            "slices_total", "slices_scored", "slices_used", "model", "bundle_sha256",
            "backend", "precision")


@pytest.fixture(scope="module")
def lesion_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny (32 x 32, 2 mm) bundle whose mask head sees lesion in a fifth of the brain and
    whose class head is mild, so that rows carry real P(HGG) values and lesion volumes."""
    import torch

    from ubc.bundle import Preprocessing, create_bundle
    from ubc.model import build_model

    torch.manual_seed(1)
    state = build_model().state_dict()
    state["net.segmentation_head.0.bias"] -= 0.6  # lesion in ~20% of the brain
    state["net.classification_head.3.weight"] *= 0.05
    return create_bundle(tmp_path_factory.mktemp("serve") / "lesion.ubc", arch="ubc-resnet34",
                         state_dict=state,
                         preprocessing=Preprocessing(size=TINY_SIZE, target_spacing=TINY_SPACING)
                         ).path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A real ``ubc-serve`` process on a free loopback port."""

    def __init__(self, bundle: Path, *options: str, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the shared 2-core machine
        self.log = log
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ubc.cli.serve", "--model", str(bundle), "--port",
                 str(self.port), "--backend", "torch", "--device", "cpu", *options],
                stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ubc-serve exited: {self.log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"ubc-serve not ready in {timeout} s: {self.log.read_text()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@contextlib.contextmanager
def running(bundle: Path, tmp: Path, *options: str) -> Iterator[Server]:
    server = Server(bundle, *options, log=tmp / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(lesion_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """ubc-serve with a token and a 16 MB upload limit."""
    tmp = tmp_path_factory.mktemp("server")
    (tmp / "token").write_text(TOKEN + "\n")
    with running(lesion_bundle, tmp, "--token-file", str(tmp / "token"), "--max-upload-mb",
                 "16", "--max-wait-ms", "20") as s:
        yield s


@pytest.fixture(scope="module")
def offline(lesion_bundle: Path, phantom_archive: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """ubc-infer's rows (and masks) on the phantoms, same bundle and backend."""
    out = tmp_path_factory.mktemp("offline")
    score_archive(lesion_bundle, phantom_archive, out / "rows.csv", masks=out / "masks",
                  backend="torch", device="cpu")
    return {r.case_id: r for r in read_results(out / "rows.csv")}, out / "masks"


def _post(url: str, body: bytes, path: str = "/v1/predict", **params: str) -> httpx.Response:
    return httpx.post(url + path, content=body, params=params, headers=AUTH, timeout=60)


def _same_row(got: dict, row) -> None:
    want = {k: v for k, v in row.to_row().items() if k in _COLUMNS}
    p_got, p_want = got.pop("p_hgg"), want.pop("p_hgg")
    assert {k: got[k] for k in want} == want
    assert p_got == pytest.approx(p_want, abs=1e-6)


def test_probes_model_and_metrics(server: Server, lesion_bundle: Path) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").status_code == 200  # probes need no token
    model = httpx.get(server.url + "/v1/model", headers=AUTH).json()
    assert model["arch"] == "ubc-resnet34" and model["class_names"] == ["LGG", "HGG"]
    assert model["engine"]["backend"] == "torch" and model["preprocessing"]["size"] == [32, 32]
    metrics = httpx.get(server.url + "/metrics", headers=AUTH)
    assert metrics.status_code == 200 and "ubc_engine_batch_size_bucket" in metrics.text
    assert "ubc_queue_slices" in metrics.text and "ubc_engine_busy_seconds_total" in metrics.text


def test_predictions_match_ubc_infer_rows(server: Server, phantom_archive: Path,
                                          offline) -> None:
    rows, masks = offline
    cases = discover_cases(phantom_archive)
    answers = {}

    def post(case) -> None:
        answers[case.case_id] = _post(server.url, case.image.read_bytes(), case_id=case.case_id)

    threads = [threading.Thread(target=post, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for case in cases:
        answer = answers[case.case_id]
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["status"] == "ok" and got["lesion_volume_ml"] > 0
        slices = got.pop("slices")
        assert len(slices["index"]) == len(slices["p_hgg"]) == got["slices_scored"]
        got.pop("seconds")
        _same_row(got, rows[case.case_id])
    # the mask endpoint: the same mask as ubc-infer --masks, in the file's grid
    case = cases[0]
    answer = _post(server.url, case.image.read_bytes(), "/v1/mask", case_id=case.case_id)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/gzip"
    _same_row(json.loads(answer.headers["x-ubc-result"]), rows[case.case_id])
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(answer.content))
    expected = nib.load(masks / f"{safe_name(case.case_id)}.nii.gz")
    assert np.array_equal(np.asarray(mask.dataobj), np.asarray(expected.dataobj))
    assert np.allclose(mask.affine, expected.affine) and np.asarray(mask.dataobj).any()
    # one mask encoder: the very bytes of ubc-infer's mask file
    assert answer.content == (masks / f"{safe_name(case.case_id)}.nii.gz").read_bytes()
    stats = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert 'ubc_requests_total{endpoint="predict",status="200"}' in stats


@pytest.mark.real
@pytest.mark.slow
def test_real_volumes_match_ubc_infer(server: Server, real_volume_paths, lesion_bundle: Path,
                                      tmp_path: Path) -> None:
    paths = [real_volume_paths["brats_flair"], real_volume_paths["tcga_flair"]]
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in paths))
    score_archive(lesion_bundle, tmp_path / "list.txt", tmp_path / "rows.csv",
                  backend="torch", device="cpu")
    rows = {Path(r.path).name: r for r in read_results(tmp_path / "rows.csv")}
    for path in paths:
        answer = _post(server.url, path.read_bytes(), case_id=rows[path.name].case_id)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["slices_total"] == 155
        _same_row(got, rows[path.name])


def test_auth(server: Server, phantom_archive: Path) -> None:
    body = discover_cases(phantom_archive)[0].image.read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        answer = httpx.post(server.url + "/v1/predict", content=body, headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/model").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401


def test_bad_bodies_get_the_loaders_message(server: Server, mixed_archive, lesion_bundle,
                                            tmp_path: Path) -> None:
    root, bad = mixed_archive
    score_archive(lesion_bundle, root / "bad", tmp_path / "rows.csv", backend="torch",
                  device="cpu")
    rows = read_results(tmp_path / "rows.csv")
    assert len(rows) == len(bad) and {r.status for r in rows} == {"error"}
    for row in rows:
        answer = _post(server.url, Path(row.path).read_bytes(), case_id="x1")
        assert answer.status_code == 422, (row.case_id, answer.text)
        assert answer.json()["detail"] == (row.error or "").replace(row.path, "<in memory>")
        assert "Traceback" not in answer.text and str(root) not in answer.text
    empty = _post(server.url, b"")
    assert empty.status_code == 400 and "empty body" in empty.json()["detail"]
    bad_query = _post(server.url, b"x", case_id="c" * 300)
    assert bad_query.status_code == 422


def test_upload_limits(server: Server) -> None:
    # declared too large: refused from the headers alone, before any body byte is sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 17000000\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")
    # streamed without a length: counted while it arrives
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"\0" * (1 << 20)

    with contextlib.suppress(httpx.WriteError):  # the server may close before the end
        answer = httpx.post(server.url + "/v1/predict", content=chunks(), headers=AUTH,
                            timeout=60)
        assert answer.status_code == 413
    # a gzip bomb (2 GB of zeros in 2 MB) is refused by the loader's caps, at once
    bomb = gzip.compress(b"\0" * (256 << 20), compresslevel=9) * 8
    start = time.monotonic()
    answer = _post(server.url, bomb)
    assert answer.status_code == 422 and time.monotonic() - start < 10, answer.text
    assert httpx.get(server.url + "/readyz").status_code == 200  # still serving


def test_openapi_schema_with_schemathesis(server: Server) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    # /v1/studies takes bodies that schemathesis sends as it sends any binary body
    schemathesis.serializer.alias(["multipart/related", "application/zip"],
                                  "application/octet-stream")
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    for operation in schema.get_all_operations():
        op = operation.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=8, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            case.call_and_validate(base_url=server.url, headers=AUTH, checks=checks,
                                   timeout=30)

        check()


@pytest.fixture(scope="module")
def slow_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (128, 128, 48) phantom: about 40 slices for the engine."""
    from ubc.synth import write_archive

    root = write_archive(tmp_path_factory.mktemp("big") / "a", 1, seed=9, shape=(128, 128, 48))
    return discover_cases(root)[0].image


@pytest.fixture(scope="module")
def busy_server(lesion_bundle: Path, tmp_path_factory: pytest.TempPathFactory) \
        -> Iterator[Server]:
    """ubc-serve with one slice per engine call and a 60-slice queue: easy to fill."""
    with running(lesion_bundle, tmp_path_factory.mktemp("busy"), "--max-queue", "60",
                 "--max-batch", "1", "--max-wait-ms", "0") as s:
        yield s


def _post_in_threads(url: str, body: bytes, n: int) -> list[tuple[float, httpx.Response]]:
    """``n`` concurrent posts; (time answered, answer) in answer order."""
    answers: list[tuple[float, httpx.Response]] = []
    lock = threading.Lock()

    def post() -> None:
        answer = httpx.post(url + "/v1/predict", content=body, timeout=120)
        with lock:
            answers.append((time.monotonic(), answer))

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


@pytest.mark.slow  # a second server: ~20 s to start on the shared machine
def test_overload_answers_503_with_retry_after(busy_server: Server, slow_volume: Path) -> None:
    answers = [a for _, a in _post_in_threads(busy_server.url, slow_volume.read_bytes(), 12)]
    statuses = sorted(a.status_code for a in answers)
    refused = [a for a in answers if a.status_code == 503]
    assert set(statuses) == {200, 503} and len(statuses) == 12, statuses
    assert all(a.headers["retry-after"] == "1" for a in refused)
    ok = [a.json() for a in answers if a.status_code == 200]
    assert all(o == {**ok[0], "seconds": o["seconds"]} for o in ok)  # the same answer
    metrics = httpx.get(busy_server.url + "/metrics").text
    assert f'ubc_requests_total{{endpoint="predict",status="503"}} {len(refused)}.0' in metrics
    assert f"ubc_overloaded_total {len(refused)}.0" in metrics  # the predictor's own count


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight(busy_server: Server, slow_volume: Path) -> None:
    body, url = slow_volume.read_bytes(), busy_server.url
    done: list[tuple[float, httpx.Response]] = []
    poster = threading.Thread(target=lambda: done.extend(_post_in_threads(url, body, 1)))
    poster.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the engine works on it
        if "ubc_queue_slices 0.0" not in httpx.get(url + "/metrics").text:
            break
        time.sleep(0.01)
    sent = time.monotonic()
    busy_server.process.send_signal(signal.SIGTERM)
    poster.join()
    assert busy_server.process.wait(timeout=60) == 0
    assert len(done) == 1 and done[0][1].status_code == 200, done
    assert done[0][0] > sent  # it was still in flight at SIGTERM
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2)
