"""ubc-serve's ``POST /v1/studies`` (issue 30) end to end: a real ``ubc-serve`` process on a
free loopback port, ``dicomweb-client``'s ``store_instances`` as the real STOW-RS client and
a zip over httpx; answers compared with ubc-infer's row and SEG on the same files; limits
(413 from Content-Length and from an instance's header), garbage parts and two studies
(422 naming them), another content type (415)."""

from __future__ import annotations

import io
import json
import random
import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import test_serve
from test_serve import Server, running

from ubc.scoring import read_results, score_archive

pytest.importorskip("fastapi")
pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
dicomweb_client = pytest.importorskip("dicomweb_client")

from ubc.serve.dicom_upload import answer_of  # noqa: E402  (needs pydicom)

#: test_serve's fixture: a bundle that sees lesions (the tiny bundle's rows are no_lesion: no
#: P(HGG) to compare, an empty SEG)
lesion_bundle = test_serve.lesion_bundle

_COMPARED = ("case_id", "status", "predicted_class", "lesion_volume_ml", "slices_total",
             "slices_scored", "slices_used", "model", "bundle_sha256", "backend", "precision",
             "study_uid", "series_uid", "series_description", "flags")


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two DICOM phantom studies (64 x 64 x 24), each a FLAIR and a T1 decoy series."""
    from ubc.synth import write_dicom_archive

    return write_dicom_archive(tmp_path_factory.mktemp("dicom") / "archive", 2, seed=5,
                               shape=(64, 64, 24))


@pytest.fixture(scope="module")
def study(studies: Path) -> Path:
    return sorted(p for p in studies.iterdir() if p.is_dir())[0]


@pytest.fixture(scope="module")
def offline(lesion_bundle: Path, study: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[dict, Path]:
    """ubc-infer's row and SEG of the first study, same bundle and backend."""
    out = tmp_path_factory.mktemp("offline")
    score_archive(lesion_bundle, study, out / "rows.csv", dicom_seg=out / "seg",
                  backend="torch", device="cpu")
    (row,) = read_results(out / "rows.csv")
    (seg,) = (out / "seg").rglob("*.dcm")
    return row.to_row(), seg


@pytest.fixture(scope="module")
def server(lesion_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """ubc-serve with a 1 MB upload limit (a phantom study is about 0.4 MB)."""
    with running(lesion_bundle, tmp_path_factory.mktemp("server"), "--max-upload-mb", "1",
                 "--max-wait-ms", "20") as s:
        yield s


def _datasets(folder: Path) -> list:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "labels.csv")
    datasets = [pydicom.dcmread(f) for f in files if pydicom.misc.is_dicom(f)]
    random.Random(3).shuffle(datasets)  # the series is found by its headers, not the order
    return datasets


def _client(server: Server):
    return dicomweb_client.DICOMwebClient(url=f"{server.url}/v1")


def _same_row(got: dict, want: dict) -> None:
    assert {k: got[k] for k in _COMPARED} == {k: want[k] for k in _COMPARED}
    if want["p_hgg"] is None:
        assert got["p_hgg"] is None
    else:
        assert got["p_hgg"] == pytest.approx(want["p_hgg"], abs=1e-6)


def _refused(call) -> httpx.Response | object:
    """The HTTP error answer of a dicomweb-client call that must fail."""
    import requests

    with pytest.raises(requests.HTTPError) as failed:
        call()
    return failed.value.response


def test_store_instances_gives_ubc_infer_row_and_seg(server: Server, study: Path,
                                                     offline) -> None:
    want, offline_seg = offline
    datasets = _datasets(study)
    flair_uid = next(ds.SeriesInstanceUID for ds in datasets if "FLAIR" in
                     ds.SeriesDescription)
    # the T1 decoy travels in the same body and is not chosen
    assert {ds.SeriesDescription for ds in datasets} == {"AX T2 FLAIR", "AX T1 SE"}
    answer = _client(server).store_instances(datasets)  # POSTs {url}/studies
    got, seg = answer_of(answer)
    assert seg is None and got["series_uid"] == flair_uid
    assert got["status"] == "ok" and got["p_hgg"] is not None
    _same_row(got, want)
    # the SEG on request (to the study's own URL, in chunks as for any body over the
    # client's chunk size), as ubc-infer writes it
    chunked = dicomweb_client.DICOMwebClient(url=f"{server.url}/v1", chunk_size=1 << 16)
    answer = chunked.store_instances(datasets, study_instance_uid=want["study_uid"],
                                     additional_params={"seg": "true"})
    got, seg = answer_of(answer)
    _same_row(got, want)
    assert seg is not None
    read = hd.seg.segread(io.BytesIO(seg))
    assert read.ReferencedSeriesSequence[0].SeriesInstanceUID == flair_uid
    assert read.pixel_array.any()
    assert np.array_equal(read.pixel_array, hd.seg.segread(offline_seg).pixel_array)
    # a zip of the study folder (both series), plain JSON on request: the same row
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(study.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(study).as_posix())
    reply = httpx.post(server.url + "/v1/studies", content=buffer.getvalue(), timeout=60,
                       headers={"Content-Type": "application/zip", "Accept": "application/json"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    _same_row(reply.json(), want)
    stats = httpx.get(server.url + "/metrics").text
    assert 'ubc_requests_total{endpoint="studies",status="200"}' in stats


def test_limits_garbage_and_other_studies(server: Server, studies: Path, study: Path) -> None:
    client, datasets = _client(server), _datasets(study)
    # declared too large: refused from the headers alone, before any body byte is sent
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/studies HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n"
                     b'Content-Type: multipart/related; type="application/dicom"; '
                     b"boundary=b\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
    # an instance whose header declares a huge image: 413 before any pixel is decoded
    huge = [ds.copy() for ds in datasets]
    flair = next(ds for ds in huge if "FLAIR" in ds.SeriesDescription)
    flair.Rows = flair.Columns = 30000
    reply = _refused(lambda: client.store_instances(huge))
    assert reply.status_code == 413 and "MB per volume" in reply.json()["detail"]
    # garbage parts: named
    body = (b"--b\r\nContent-Type: application/dicom\r\n\r\n" + _part10(datasets[0]) +
            b"\r\n--b\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n--b--")
    reply = _post(server, body)
    assert reply.status_code == 422 and "part 2 " in reply.json()["detail"], reply.text
    reply = _post(server, body[:-7])  # cut short: no closing boundary
    assert reply.status_code == 422 and "no closing boundary" in reply.json()["detail"]
    # two studies in one body: 422 naming both
    other = _datasets(sorted(p for p in studies.iterdir() if p.is_dir())[1])
    reply = _refused(lambda: client.store_instances(datasets[:2] + other[:2]))
    uids = {datasets[0].StudyInstanceUID, other[0].StudyInstanceUID}
    assert reply.status_code == 422 and all(u in reply.json()["detail"] for u in uids)
    # a study without a FLAIR: 422 saying what it holds
    t1 = [ds for ds in datasets if "T1" in ds.SeriesDescription]
    reply = _refused(lambda: client.store_instances(t1))
    assert reply.status_code == 422 and "AX T1 SE" in reply.json()["detail"], reply.text
    # another content type: 415 before the body is read
    reply = httpx.post(server.url + "/v1/studies", content=b"x", timeout=30,
                       headers={"Content-Type": "application/octet-stream"})
    assert reply.status_code == 415 and "application/zip" in reply.json()["detail"]
    # a zip of junk: 422
    reply = httpx.post(server.url + "/v1/studies", content=b"PK\x03\x04junk", timeout=30,
                       headers={"Content-Type": "application/zip"})
    assert reply.status_code == 422 and "zip" in reply.json()["detail"]
    assert httpx.get(server.url + "/readyz").status_code == 200  # still serving


def _part10(ds) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def _post(server: Server, body: bytes) -> httpx.Response:
    return httpx.post(server.url + "/v1/studies", content=body, timeout=60, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})


def test_the_answer_is_what_a_dicom_json_reader_reads() -> None:
    from ubc.serve.dicom_upload import dicom_json, split_parts

    answer = pydicom.Dataset.from_json(json.dumps(dicom_json({"status": "ok"}, b"\0\1")))
    assert answer_of(answer) == ({"status": "ok"}, b"\0\1")
    body = b"preamble\r\n--x  \r\nA: 1\r\n\r\none\r\n--x\r\n\r\ntwo\r\n--x--\r\nepilogue"
    assert [bytes(p) for p in split_parts(body, "x")] == [b"A: 1\r\n\r\none", b"\r\ntwo"]
