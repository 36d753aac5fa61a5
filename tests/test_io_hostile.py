"""Hostile NIfTI files (issue 9): each is refused with UBCInputError naming the file and the
problem, before memory is allocated for voxels the file does not hold. Peak RSS growth while
loading all of them (and the fuzzer's regression files) is measured in a fresh interpreter."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ubc.errors import UBCInputError
from ubc.io import MAX_VOXELS, load_volume

REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions" / "nifti"
#: fuzz findings of valid volumes the loader rightly accepts (a voxel type preprocessing
#: once refused); the others must be refused
ACCEPTED = "loader_accepts"


def refused_regressions() -> list[Path]:
    return sorted(p for p in REGRESSIONS.glob("*.nii*") if ACCEPTED not in p.name)
RSS_GROWTH_LIMIT = 100 * 1024 * 1024  # bytes
SHAPE = (4, 4, 4)


def valid_bytes(shape: tuple[int, ...] = SHAPE, dtype: str = "uint8") -> bytes:
    data = (np.arange(int(np.prod(shape))) % 50 + 1).reshape(shape).astype(dtype)
    return bytes(nib.Nifti1Image(data, np.eye(4)).to_bytes())


def with_header(raw: bytes, **fields: object) -> bytes:
    """``raw`` (a .nii) with header fields replaced, data bytes unchanged."""
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    for name, value in fields.items():
        header[name] = value
    return header.binaryblock + raw[348:]


def gzip_bomb(raw: bytes, extra: int) -> bytes:
    """One gzip member: ``raw`` then ``extra`` zero bytes (1000x smaller compressed)."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [packer.compress(raw)]
    zeros = bytes(1 << 20)
    parts += [packer.compress(zeros) for _ in range(extra >> 20)]
    return b"".join(parts) + packer.flush()


def hostile_files(folder: Path) -> dict[Path, str]:
    """Write the hostile files; path -> regex the error must match after the file name."""
    good = valid_bytes()
    huge_dim = [4, 10, 522, 256, 12800, 1, 1, 1]  # 1.7e10 voxels in a 384-byte file
    under_cap = [3, 1000, 1000, 1000, 1, 1, 1, 1]  # 1e9 voxels: under the cap, bytes absent
    cases: dict[str, tuple[bytes, str]] = {
        "huge_shape.nii": (with_header(good, dim=huge_dim)[:384],
                           r"shape \(10, 522, 256, 12800\) = 17,104,896,000 voxels.*cap"),
        "huge_shape.nii.gz": (gzip.compress(with_header(good, dim=huge_dim)[:384]), "cap"),
        "declared_gb_plain.nii": (with_header(good, dim=under_cap), "truncated"),
        "declared_gb_gzip.nii.gz": (gzip.compress(with_header(good, dim=under_cap)),
                                    "truncated"),
        "truncated_data.nii": (good[:352 + 20], "truncated: header declares 64 bytes"),
        "gzip_bomb.nii.gz": (gzip_bomb(good, 64 << 20), "gzip bomb"),
        "gzip_bomb_members.nii.gz": (gzip.compress(good) + gzip.compress(bytes(1 << 20)) * 64,
                                     "gzip bomb"),
        "singular_sform.nii": (with_header(good, sform_code=1, srow_x=[0, 0, 0, 0]),
                               r"sform.*singular"),
        "nan_sform.nii": (with_header(good, sform_code=1, srow_y=[0, np.nan, 0, 0]),
                          r"sform.*not finite"),
        "inf_qform.nii.gz": (gzip.compress(with_header(good, sform_code=0, qform_code=1,
                                                       qoffset_x=np.inf)),
                             r"qform.*not finite"),
        "zero_pixdim.nii": (with_header(good, pixdim=[1, 0, 1, 1, 1, 1, 1, 1]),
                            r"pixdim\[1\] = 0"),
        "nan_pixdim.nii": (with_header(good, pixdim=[1, 1, np.nan, 1, 1, 1, 1, 1]),
                           r"pixdim\[2\] = nan"),
        "denormal_pixdim.nii": (with_header(good, pixdim=[1, 1, 1, 1e-40, 1, 1, 1, 1]),
                                r"pixdim\[3\]"),
        "dim0_zero.nii": (with_header(good, dim=[0, 4, 4, 4, 1, 1, 1, 1]), r"dim\[0\] = 0"),
        "dim0_nine.nii": (with_header(good, dim=[9, 4, 4, 4, 1, 1, 1, 1]), r"dim\[0\] = 9"),
        "negative_dim.nii": (with_header(good, dim=[3, 4, -4, 4, 1, 1, 1, 1]), "negative"),
        "bitpix_mismatch.nii": (with_header(good, bitpix=64), "bitpix 64 does not match"),
        "unknown_datatype.nii": (with_header(good, datatype=1234), "datatype code 1234"),
        "vox_offset_huge.nii.gz": (gzip.compress(with_header(good, vox_offset=4e9)),
                                   "vox_offset 4e\\+09"),
        "vox_offset_far.nii.gz": (gzip.compress(with_header(good, vox_offset=16 << 20)),
                                  "truncated"),
        "vox_offset_zero.nii": (with_header(good, vox_offset=0), "vox_offset 0 "),
        "vox_offset_nan.nii": (with_header(good, vox_offset=np.nan), "vox_offset nan"),
        "scale_overflow.nii": (with_header(valid_bytes(dtype="int16"), scl_slope=1e38),
                               "scl_slope 1e\\+38 .*beyond the float32 range"),
    }
    written = {}
    for name, (raw, words) in cases.items():
        (folder / name).write_bytes(raw)
        written[folder / name] = words
    return written


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, str]:
    return hostile_files(tmp_path_factory.mktemp("hostile"))


def test_each_hostile_file_is_refused_naming_the_file_and_the_problem(
        hostile: dict[Path, str]) -> None:
    for path, words in hostile.items():
        with pytest.raises(UBCInputError, match=rf"{path.name}: .*{words}"):
            load_volume(path)


def test_regression_files_are_refused_or_scored() -> None:
    """Each fuzz finding: a file the loader must refuse naming it, or (``*loader_accepts*``)
    a volume it rightly reads, which later steps once mishandled (tests/test_fuzz.py replays
    them through the scoring steps)."""
    files = sorted(REGRESSIONS.glob("*.nii*"))
    assert files, f"no regression files in {REGRESSIONS}"
    for path in files:
        if ACCEPTED in path.name:
            assert load_volume(path).data.ndim == 3
            continue
        with pytest.raises(UBCInputError, match=rf"{path.name}: "):
            load_volume(path)


def test_voxel_cap_is_documented_overridable_and_named(tmp_path: Path) -> None:
    assert MAX_VOXELS >= 512 * 512 * 512  # every real MRI (see ubc.io.nifti.MAX_VOXELS)
    path = tmp_path / "small.nii.gz"
    path.write_bytes(gzip.compress(valid_bytes((20, 30, 10), "int16")))
    assert load_volume(path).data.shape == (20, 30, 10)
    with pytest.raises(UBCInputError, match=r"small\.nii\.gz: .*\(20, 30, 10\) = 6,000 voxels, "
                                            r"more than the cap of 5,999"):
        load_volume(path, max_voxels=5999)
    assert load_volume(path, max_voxels=6000).data.shape == (20, 30, 10)
    with pytest.raises(ValueError, match="max_voxels"):
        load_volume(path, max_voxels=0)


def test_trailing_bytes_within_the_margin_still_load(tmp_path: Path) -> None:
    raw = valid_bytes()
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(gzip.compress(raw + bytes(1000)) + bytes(16))  # + zero padding
    plain = tmp_path / "padded.nii"
    plain.write_bytes(raw + b"junk")
    expected = np.frombuffer(raw[352:], np.uint8).reshape(SHAPE, order="F")
    for path in (padded, plain):
        np.testing.assert_array_equal(load_volume(path).data, expected)


def test_scaling_that_fits_float32_and_non_finite_floats_still_load(tmp_path: Path) -> None:
    # Refusing overflow must not refuse big-but-finite results or a float scan's own NaN
    # (preprocessing names that one).
    big = tmp_path / "big.nii"
    big.write_bytes(with_header(valid_bytes(dtype="int16"), scl_slope=1e36))
    assert np.isfinite(load_volume(big).data).all()
    data = np.ones(SHAPE, np.float32)
    data[1, 2, 3] = np.inf
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(2.0, 0.0)
    raw = tmp_path / "inf.nii"
    nib.save(image, raw)
    assert np.isinf(load_volume(raw).data).sum() == 1


def test_corrupt_gzip_checksum_is_reported(tmp_path: Path) -> None:
    packed = bytearray(gzip.compress(valid_bytes()))
    packed[-8] ^= 0xFF  # CRC-32 of the member
    path = tmp_path / "bad_crc.nii.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(UBCInputError, match=r"bad_crc\.nii\.gz: corrupt or truncated gzip"):
        load_volume(path)


MEASURE = """
import json, resource, sys
from ubc.errors import UBCInputError
from ubc.io import load_volume
load_volume(sys.argv[1])  # warm: lazy imports, allocator arenas
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = {}
for path in sys.argv[2:]:
    try:
        load_volume(path)
        outcomes[path] = "loaded"
    except UBCInputError as exc:
        outcomes[path] = "UBCInputError: " + str(exc)
    except BaseException as exc:
        outcomes[path] = type(exc).__name__ + ": " + str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth": (after - before) * 1024, "outcomes": outcomes}))
"""


def test_peak_memory_stays_bounded_while_refusing_them(tmp_path: Path,
                                                       hostile: dict[Path, str]) -> None:
    warm = tmp_path / "warm.nii.gz"
    warm.write_bytes(gzip.compress(valid_bytes()))
    files = [str(p) for p in hostile] + [str(p) for p in refused_regressions()]
    run = subprocess.run([sys.executable, "-c", MEASURE, str(warm), *files],
                         capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for path, outcome in result["outcomes"].items():
        assert outcome.startswith(f"UBCInputError: {path}: "), (path, outcome)
    assert result["growth"] < RSS_GROWTH_LIMIT, result["growth"]
