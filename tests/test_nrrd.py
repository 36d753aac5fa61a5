"""NRRD input (``ubc.io.nrrd``, the first reader added behind ``ubc.io.readers``): the same
volume as NIfTI and as NRRD loads to the same voxels and grid and scores to the same row;
hostile headers are refused, naming the file, before anything large is allocated."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from ubc.errors import UBCInputError
from ubc.io import load_volume
from ubc.io.nrrd import MAX_HEADER_BYTES, load_nrrd
from ubc.io.readers import NO_IDENTITY, NrrdFile
from ubc.scoring import Predictor, discover_cases, read_results, score_archive

LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_as_nrrd(source: Path, target: Path, *, encoding: str = "gzip",
                  detached: bool = False) -> Path:
    """The NIfTI file's voxels and grid written as NRRD in LPS, as 3D Slicer writes it."""
    image = nib.load(source)
    header = {"space": "left-posterior-superior", "encoding": encoding,
              "space directions": (LPS @ image.affine[:3, :3]).T,
              "space origin": LPS @ image.affine[:3, 3], "kinds": ["domain"] * 3}
    target.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(target), np.asarray(image.dataobj), header, detached_header=detached)
    return target


def assert_same_volume(a, b) -> None:
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    np.testing.assert_allclose(a.original_affine, b.original_affine, atol=1e-5)
    assert a.spacing == pytest.approx(b.spacing) and a.original_shape == b.original_shape


@pytest.mark.parametrize("encoding,detached", [("gzip", False), ("raw", False),
                                               ("raw", True), ("gzip", True)])
def test_nrrd_loads_as_the_same_volume_as_nifti(phantom_archive: Path, tmp_path: Path,
                                               encoding: str, detached: bool) -> None:
    source = sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))[0]
    suffix = ".nhdr" if detached else ".nrrd"
    target = nifti_as_nrrd(source, tmp_path / f"v{suffix}", encoding=encoding,
                           detached=detached)
    assert_same_volume(load_nrrd(target), load_volume(source))


@pytest.mark.real
def test_real_volumes_as_nrrd(real_volume_paths: dict[str, Path], tmp_path: Path) -> None:
    for role in ("brats_flair", "tcga_flair"):
        source = real_volume_paths[role]
        assert_same_volume(load_nrrd(nifti_as_nrrd(source, tmp_path / f"{role}.nrrd")),
                           load_volume(source))


def _nrrd_archive(phantom_archive: Path, root: Path) -> Path:
    """The phantom archive with every FLAIR as NRRD (half attached gzip, half detached)."""
    for i, source in enumerate(sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))):
        case = source.parent.name
        nifti_as_nrrd(source, root / case / f"{case}_flair{'.nhdr' if i % 2 else '.nrrd'}",
                      encoding="gzip", detached=bool(i % 2))
    return root


_SAME = ("status", "error", "p_hgg", "predicted_class", "lesion_volume_ml", "slices_total",
         "slices_scored", "slices_used", "flags")


def test_an_nrrd_archive_scores_as_its_nifti_twin(phantom_archive: Path, tiny_bundle: Path,
                                                  tmp_path: Path) -> None:
    root = _nrrd_archive(phantom_archive, tmp_path / "nrrd")
    assert sorted(c.case_id for c in discover_cases(root)) == \
        sorted(c.case_id for c in discover_cases(phantom_archive))
    rows = {}
    for name, archive in (("nifti", phantom_archive), ("nrrd", root)):
        out = tmp_path / f"{name}.jsonl"
        score_archive(tiny_bundle, archive, out, backend="torch", device="cpu",
                      masks=tmp_path / f"masks_{name}")
        rows[name] = {r.case_id: r for r in read_results(out)}
    assert rows["nifti"].keys() == rows["nrrd"].keys() and len(rows["nrrd"]) == 6
    for case_id, row in rows["nrrd"].items():
        twin = rows["nifti"][case_id]
        assert {k: getattr(row, k) for k in _SAME} == {k: getattr(twin, k) for k in _SAME}
        assert row.path.endswith((".nrrd", ".nhdr")) and row.status != "error"
        mask = nib.load(tmp_path / "masks_nrrd" / f"{case_id}.nii.gz")
        twin_mask = nib.load(tmp_path / "masks_nifti" / f"{case_id}.nii.gz")
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(twin_mask.dataobj))
        np.testing.assert_allclose(mask.affine, twin_mask.affine, atol=1e-5)


def test_a_detached_data_file_is_part_of_the_resume_identity(phantom_archive: Path,
                                                             tiny_bundle: Path,
                                                             tmp_path: Path) -> None:
    source = sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))[0]
    header = nifti_as_nrrd(source, tmp_path / "in" / "a_flair.nhdr", encoding="gzip",
                           detached=True)
    data = next(p for p in header.parent.iterdir() if p != header)
    out = tmp_path / "rows.csv"
    first = score_archive(tiny_bundle, header.parent, out, backend="torch", device="cpu")
    again = score_archive(tiny_bundle, header.parent, out, backend="torch", device="cpu")
    assert (first.scored, again.scored, again.skipped) == (1, 0, 1)
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the voxels changed
    assert score_archive(tiny_bundle, header.parent, out, backend="torch",
                         device="cpu").scored == 1


def test_predictor_takes_an_nrrd_path(phantom_archive: Path, tiny_bundle: Path,
                                      tmp_path: Path) -> None:
    source = sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))[0]
    target = nifti_as_nrrd(source, tmp_path / "a.nrrd")
    with Predictor(tiny_bundle, backend="torch", device="cpu") as predictor:
        got, want = predictor.predict(target), predictor.predict(source)
    assert got.p_hgg == pytest.approx(want.p_hgg) and got.status == want.status
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-5)


# --- hostile files ------------------------------------------------------------------------
def _header(**fields: str) -> str:
    base = {"type": "short", "dimension": "3", "sizes": "4 4 4", "encoding": "raw",
            "endian": "little", "space": "left-posterior-superior",
            "space directions": "(1,0,0) (0,1,0) (0,0,1)", "space origin": "(0,0,0)"}
    base.update({k.replace("_", " "): v for k, v in fields.items()})
    lines = [f"{k}: {v}" for k, v in base.items() if v]
    return "NRRD0004\n" + "\n".join(lines) + "\n\n"


def _write(path: Path, header: str, data: bytes = bytes(128)) -> Path:
    path.write_bytes(header.encode() + data)
    return path


HOSTILE = {
    "over_the_voxel_cap": (_header(sizes="4096 4096 4096"), b"", "over the limit"),
    "truncated": (_header(), bytes(10), "truncated"),
    "ascii": (_header(encoding="ascii"), b"1 2 3", "encoding 'ascii' is not supported"),
    "block_type": (_header(type="block", block_size="4"), bytes(64), "NRRD type"),
    "no_patient_space": (_header(space="scanner-xyz"), bytes(128), "no patient orientation"),
    "singular": (_header(space_directions="(1,0,0) (1,0,0) (0,0,1)"), bytes(128),
                 "singular"),
    # found by the fuzzer: two axes 1e-16 from parallel (det not 0, no orientation)
    "collinear": (_header(space_directions="(0.9,0,0) (9,0.0000000000000002,0) (0,0,2)"),
                  bytes(128), "collinear axes"),
    "nan_spacing": (_header(space_directions="(nan,0,0) (0,1,0) (0,0,1)"), bytes(128),
                    "singular or not finite"),
    "two_volumes": (_header(dimension="4", sizes="4 4 4 2", space_directions=""),
                    bytes(256), "not a 3-D volume|cannot read as NRRD|expected a 3-D"),
    "garbage": ("NRRD0004\ntype: short\nsizes: x y z\n\n", b"", "malformed NRRD header"),
    "not_nrrd": ("P5 4 4 255\n\n", bytes(16), "not an NRRD file"),
    "skip": (_header(byte_skip="-1"), bytes(128), "skip is not supported"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_nrrd_is_refused_naming_the_file(tmp_path: Path, name: str) -> None:
    header, data, words = HOSTILE[name]
    path = _write(tmp_path / f"{name}.nrrd", header, data)
    with pytest.raises(UBCInputError) as info:
        load_nrrd(path)
    assert str(path) in str(info.value)
    assert any(w in str(info.value) for w in words.split("|")), str(info.value)


def test_a_gzip_bomb_is_refused_after_the_declared_bytes(tmp_path: Path) -> None:
    bomb = gzip.compress(bytes(64 * 1024 * 1024), compresslevel=9)  # 64 MB in ~64 kB
    path = _write(tmp_path / "bomb.nrrd", _header(encoding="gzip"), bomb)
    with pytest.raises(UBCInputError, match="gzip bomb"):
        load_nrrd(path)


def test_a_header_that_never_ends_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "endless.nrrd"
    path.write_bytes(_header()[:-1].encode() + b"# x\n" * (MAX_HEADER_BYTES // 4 + 10))
    with pytest.raises(UBCInputError, match="no end of the NRRD header"):
        load_nrrd(path)


@pytest.mark.parametrize("data_file", ["../outside.raw", "/etc/hostname", "LIST",
                                       "slice%03d.raw 0 3 1"])
def test_a_detached_header_may_not_point_elsewhere(tmp_path: Path, data_file: str) -> None:
    (tmp_path / "outside.raw").write_bytes(bytes(128))
    folder = tmp_path / "in"
    folder.mkdir()
    path = _write(folder / "a.nhdr", _header(data_file=data_file), b"")
    with pytest.raises(UBCInputError, match="not beside the header|not supported") as info:
        load_nrrd(path)
    assert str(path) in str(info.value)


def test_a_missing_data_file_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.nhdr", _header(data_file="a.raw"), b"")
    with pytest.raises(UBCInputError, match="file not found"):
        load_nrrd(path)
    assert NrrdFile(path).identity() == NO_IDENTITY  # a resumed run scores it again
