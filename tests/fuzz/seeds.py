"""The checked-in seed corpus: small valid files of every kind a target reads.

``python -m tests.fuzz.seeds`` rewrites ``corpus/nifti/`` (deterministic bytes: gzip mtime 0),
adding a 16 x 16 x 4 crop of a real BraTS FLAIR when ../shared/data/real is present.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
NIFTI_CORPUS = HERE / "corpus" / "nifti"
REAL_FLAIR = HERE.parents[2] / "shared" / "data" / "real" / "BraTS-GLI-00001-000-t2f.nii.gz"
SHAPE = (3, 4, 5)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
RAS = np.eye(4)
OBLIQUE = np.array([[0.0, 0.9, 0.1, -5], [-1.2, 0, 0, 7], [0, -0.1, 2.0, 3], [0, 0, 0, 1]])
DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float32", "float64", "complex64", "complex128")
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


def _ramp(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    values = np.arange(int(np.prod(shape))).reshape(shape, order="F") % 97 + 1
    if np.dtype(dtype).fields:
        return np.stack([values] * 3, axis=-1).astype(np.uint8).view(dtype)[..., 0]
    return values.astype(dtype)


def nifti_bytes(data: np.ndarray, affine: np.ndarray = RAS, *, version: int = 1,
                big_endian: bool = False, slope: float | None = None,
                inter: float | None = None, qform_only: bool = False,
                extension: bytes | None = None) -> bytes:
    """One single-file NIfTI (.nii bytes) holding ``data`` as given."""
    klass = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    header = klass.header_class(endianness=">" if big_endian else "<")
    image = klass(data, affine, header=header, dtype=data.dtype)
    image.header.set_xyzt_units("mm")
    if qform_only:
        image.set_sform(None, code=0)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    if extension is not None:
        image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", extension))
    return bytes(image.to_bytes())


def gz(raw: bytes, members: int = 1) -> bytes:
    """gzip bytes (mtime 0: the corpus stays byte-identical); several members if asked."""
    step = -(-len(raw) // members)
    return b"".join(gzip.compress(raw[i:i + step], mtime=0) for i in range(0, len(raw), step))


def nifti_seeds() -> dict[str, bytes]:
    """File name -> bytes of every seed."""
    seeds = {f"{name}.nii": nifti_bytes(_ramp(SHAPE, name)) for name in DTYPES}
    seeds["rgb24.nii"] = nifti_bytes(_ramp(SHAPE, RGB24))
    ramp = _ramp(SHAPE, "int16")
    seeds |= {
        "int16_be.nii": nifti_bytes(ramp, big_endian=True),
        "float32_be.nii.gz": gz(nifti_bytes(_ramp(SHAPE, "float32"), big_endian=True)),
        "int16.nii.gz": gz(nifti_bytes(ramp)),
        "uint8_lps.nii.gz": gz(nifti_bytes(_ramp(SHAPE, "uint8"), LPS)),
        "int16_scaled.nii": nifti_bytes(ramp, slope=2.0, inter=10.0),
        "uint8_scaled.nii.gz": gz(nifti_bytes(_ramp(SHAPE, "uint8"), slope=0.5, inter=-3.0)),
        "int16_4d.nii.gz": gz(nifti_bytes(_ramp((*SHAPE, 2), "int16"))),
        "int16_4d_single.nii": nifti_bytes(_ramp((*SHAPE, 1), "int16")),
        "float32_oblique_qform.nii": nifti_bytes(_ramp(SHAPE, "float32"), OBLIQUE,
                                                 qform_only=True),
        "int16_nifti2.nii": nifti_bytes(ramp, version=2),
        "int16_extension.nii": nifti_bytes(ramp, extension=b"a comment extension"),
        "int16_two_members.nii.gz": gz(nifti_bytes(ramp), members=2),
        # 3.7 KB inflating to 1 MiB: a start for the upload target's larger inputs, whose
        # fuzzer may grow it into a stream that inflates far more (issue 26)
        "uint8_ramp_1mib.nii.gz": gz(nifti_bytes(_ramp((128, 128, 64), "uint8"))),
    }
    if REAL_FLAIR.is_file():
        image = nib.load(REAL_FLAIR)
        crop = np.asanyarray(image.dataobj)[112:128, 112:128, 76:80]
        seeds["brats_flair_crop.nii.gz"] = gz(nifti_bytes(np.ascontiguousarray(crop),
                                                          image.affine))
    return seeds


def main() -> int:
    NIFTI_CORPUS.mkdir(parents=True, exist_ok=True)
    for name, raw in sorted(nifti_seeds().items()):
        (NIFTI_CORPUS / name).write_bytes(raw)
        print(f"{len(raw):6d}  {NIFTI_CORPUS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
