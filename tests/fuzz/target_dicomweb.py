"""Fuzz target ``dicomweb``: what a PACS answers over DICOMweb, through the code that reads
it (``ubc.net``): the first byte picks the answer, the rest is its body.

- ``0``: a QIDO-RS answer (JSON) -> ``dicomweb.uids_of`` (the studies or series found);
- ``1``: a WADO-RS /metadata answer (JSON) -> ``dicomweb.datasets_of`` -> the instance
  headers and the series choice (``remote._headers``, ``dicom_select.study_from_headers``);
- ``2``: a WADO-RS multipart/related body -> dicomweb-client's part decoder -> each part
  read by pydicom -> ``dicomweb.instances_of``, as ``DicomWebPacs.retrieve`` does.

Allowed outcomes: an answer read, or ``ValueError`` / ``UBCInputError`` for an answer that is
not what DICOMweb says (the study becomes an error row naming the step; ``retrieve`` says
the multipart body is malformed, or a part pydicom cannot read). Anything else is a
finding: pydicom's bare KeyError on JSON without a VR was one (now ``datasets_of`` names
it); so were pydicom's BytesLengthException on a part whose group length is 6 bytes and
its OSError writing back a group length of -4 (the study's error row said only the
exception's words; now ``instances_of`` says the answer is not DICOM instances); so are a
hang and memory past the limit.

Seeds (``corpus/dicomweb/``, written by ``python -m tests.fuzz.target_dicomweb``): answers
of each kind made from a tiny phantom MR instance.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

NAME = "dicomweb"
INSTRUMENT = ("ubc", "dicomweb_client")
SEEDS = Path(__file__).resolve().parent / "corpus" / NAME
REGRESSIONS = Path(__file__).resolve().parent / "regressions" / NAME
STUDY_UID_TAG = "0020000D"
QIDO, METADATA, MULTIPART = 0, 1, 2
BOUNDARY = "ubc-fuzz-boundary"


def prepare() -> Callable[[bytes], None]:
    """Import the code under test and return the function that runs one input."""
    import logging

    import requests
    from dicomweb_client import DICOMwebClient
    from pydicom import dcmread

    from ubc.errors import UBCInputError
    from ubc.io.dicom_select import study_from_headers
    from ubc.net.dicomweb import datasets_of, instances_of, uids_of
    from ubc.net.remote import _headers

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    client = DICOMwebClient("http://127.0.0.1:9/dicom-web")

    def metadata(body: bytes) -> None:
        datasets = datasets_of(json.loads(body))
        headers = _headers("1.2.3", "1.2.3.4", datasets)
        if headers:
            study_from_headers("1.2.3", headers, None)

    def multipart(body: bytes) -> None:
        response = requests.Response()
        response.headers["content-type"] = \
            f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
        response._content = body
        parts = client._decode_multipart_message(response, stream=False)
        for _ in instances_of(dcmread(io.BytesIO(part)) for part in parts):
            pass

    def one_input(data: bytes) -> None:
        if not data:
            return
        kind, body = data[0] % 3, data[1:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every odd value it copes with
            try:
                if kind == QIDO:
                    uids_of(json.loads(body), STUDY_UID_TAG)
                elif kind == METADATA:
                    metadata(body)
                else:
                    multipart(body)
            except (ValueError, UBCInputError):  # json's errors are ValueErrors too
                return

    return one_input


def _instance() -> bytes:
    """A tiny phantom MR instance as ``ubc-synth`` writes it."""
    from ubc.io.dicom import find_dicom_files
    from ubc.synth import write_dicom_archive

    with tempfile.TemporaryDirectory() as folder:
        root = write_dicom_archive(Path(folder) / "a", 1, seed=5, shape=(8, 8, 8))
        flair = [p for p in find_dicom_files(root) if "FLAIR" in str(p)]
        return sorted(flair)[0].read_bytes()


def dicomweb_seeds() -> dict[str, bytes]:
    """File name -> bytes of every seed (each under the fuzzer's 4 kB input limit)."""
    from pydicom import dcmread

    raw = _instance()
    ds = dcmread(io.BytesIO(raw), stop_before_pixels=True)
    header = ds.to_json_dict()
    qido = [{STUDY_UID_TAG: header[STUDY_UID_TAG]}]
    multipart = (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + raw
                 + f"\r\n--{BOUNDARY}--".encode())
    return {"qido.json": bytes([QIDO]) + json.dumps(qido).encode(),
            "metadata.json": bytes([METADATA]) + json.dumps([header]).encode(),
            "multipart.bin": bytes([MULTIPART]) + multipart}


def main() -> int:
    SEEDS.mkdir(parents=True, exist_ok=True)
    for name, raw in sorted(dicomweb_seeds().items()):
        (SEEDS / name).write_bytes(raw)
        print(f"{len(raw):6d}  {SEEDS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
