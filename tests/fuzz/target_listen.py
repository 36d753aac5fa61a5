"""Fuzz target ``listen``: the dataset bytes of a C-STORE received by the DICOM node
(``ubc-listen``). The first byte picks the presentation context's transfer syntax
(implicit VR LE, explicit VR LE, explicit VR BE, deflated explicit VR LE), the rest is the
dataset as it came over the network; the node's bytes are pynetdicom's
(``event.encoded_dataset()``: preamble, file meta of the context, the dataset), checked by
``read_instance`` and, when accepted, kept by ``InstanceSpool.add`` (in a spool of the
target's own); the kept file is then read by discovery's ``read_header``, as scoring will.

Allowed outcomes: ``Malformed`` (the node answers 0xC210), or an accepted instance whose
UIDs are DICOM UIDs, whose file lies in its study's spool folder, and whose header
discovery reads (or refuses with ``UBCInputError`` naming the file: the study's row says
so). Anything else, a hang or memory past the limit included, is a finding.

Seeds (``corpus/listen/``, written by ``python -m tests.fuzz.target_listen``): the ``dicom``
target's tiny MR instances as datasets in each transfer syntax.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

NAME = "listen"
INSTRUMENT = ("ubc", "pydicom")
SEEDS = Path(__file__).resolve().parent / "corpus" / NAME
REGRESSIONS = Path(__file__).resolve().parent / "regressions" / NAME
SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def received(dataset: bytes, syntax: str) -> bytes:
    """What pynetdicom hands the node: preamble, the file meta of the context, the dataset
    (``Event.encoded_dataset``)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MR_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4.5")
    meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset


def prepare() -> Callable[[bytes], None]:
    """Import the code under test and return the function that runs one input."""
    import logging
    import warnings

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    from ubc.errors import UBCInputError
    from ubc.io.dicom import read_header
    from ubc.net.listen_spool import InstanceSpool, Malformed, is_uid, read_instance

    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="ubc-fuzz-listen-", dir=shm if shm.is_dir() else None))
    spool = InstanceSpool(root, 1 << 30)

    def one_input(data: bytes) -> None:
        if not data:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", module="pydicom.*")
            run(received(data[1:], SYNTAXES[data[0] % len(SYNTAXES)]))

    def run(data: bytes) -> None:
        try:
            instance = read_instance(data)
        except Malformed:
            return
        assert is_uid(instance.study_uid) and is_uid(instance.sop_uid), instance
        path = spool.add(instance, data)
        try:
            assert path.parent == root / instance.study_uid and path.read_bytes() == data
            try:
                read_header(path)
            except UBCInputError as exc:
                assert str(path) in str(exc), f"error does not name the file: {exc}"
        finally:
            spool.remove(instance.study_uid)
            assert spool.bytes == 0, spool.bytes

    return one_input


def encoded(ds: object, syntax: str) -> bytes:
    """The dataset ``ds`` encoded in ``syntax`` (what a C-STORE carries, no file meta)."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax != SYNTAXES[2]
    buffer.is_implicit_VR = syntax == SYNTAXES[0]
    write_dataset(buffer, ds)  # type: ignore[arg-type]
    data = buffer.getvalue()
    if syntax == SYNTAXES[3]:
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflate.compress(data) + deflate.flush()
    return data


def listen_seeds() -> dict[str, bytes]:
    """File name -> bytes of every seed: the ``dicom`` target's seeds in each syntax."""
    import pydicom

    from .target_dicom import SEEDS as DICOM_SEEDS

    seeds = {}
    for path in sorted(DICOM_SEEDS.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for index, syntax in enumerate(SYNTAXES):
            seeds[f"{path.stem}_{index}.bin"] = bytes([index]) + encoded(ds, syntax)
    return seeds


def main() -> int:
    shutil.rmtree(SEEDS, ignore_errors=True)
    SEEDS.mkdir(parents=True)
    for name, raw in sorted(listen_seeds().items()):
        (SEEDS / name).write_bytes(raw)
        print(f"{len(raw):6d}  {SEEDS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
