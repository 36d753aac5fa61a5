"""NIfTI loading: orientation, spacing, scaling, 4-D files, compression and broken files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ubc.errors import UBCInputError
from ubc.io import load_volume, save_mask
from ubc.io.nifti import encode_mask

RAS = np.diag([1.0, 1.0, 1.0, 1.0])


def write(path, data, affine=RAS, zooms=None, slope=None, inter=None):
    image = nib.Nifti1Image(data, affine)
    if zooms is not None:
        image.header.set_zooms(zooms)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, path)
    return path


def marked_volume(shape=(20, 30, 10), dtype=np.int16):
    data = np.arange(np.prod(shape)).reshape(shape).astype(dtype)
    return data


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_ras_volume_loads_unchanged(tmp_path, suffix):
    data = marked_volume()
    volume = load_volume(write(tmp_path / f"v{suffix}", data))
    assert volume.data.dtype == np.int16  # on-disk dtype kept: no float64 blow-up
    np.testing.assert_array_equal(volume.data, data)
    assert volume.spacing == (1.0, 1.0, 1.0)
    assert volume.original_shape == data.shape
    np.testing.assert_array_equal(volume.affine, RAS)


def world(affine, index):
    return (affine @ np.array([*index, 1.0]))[:3]


@pytest.mark.parametrize("affine", [
    np.diag([-1.0, -1.0, 1.0, 1.0]),                           # LPS, as BraTS files are
    np.array([[0, 2.0, 0, 0], [1.5, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]]),  # x/y swapped
    np.array([[0, 0, -2.0, 5], [0, 1.0, 0, 0], [-1.5, 0, 0, 0], [0, 0, 0, 1]]),  # sagittal
], ids=["LPS", "swap", "sagittal"])
def test_non_ras_volumes_are_reoriented_to_canonical(tmp_path, affine):
    data = marked_volume()
    path = write(tmp_path / "v.nii.gz", data, affine=affine)
    volume = load_volume(path)
    codes = nib.aff2axcodes(volume.affine)
    assert codes == ("R", "A", "S")
    # Every canonical voxel holds the value stored at the same world position in the file.
    for index in [(0, 0, 0), (3, 7, 2), tuple(np.array(volume.data.shape) - 1)]:
        value = volume.data[index]
        original = np.argwhere(data == value)[0]
        np.testing.assert_allclose(world(volume.affine, index), world(affine, original))
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    expected_spacing = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))
    np.testing.assert_allclose(volume.spacing, expected_spacing)
    assert sorted(volume.spacing) == sorted(zooms)


def test_scaled_int16_is_scaled_to_float32(tmp_path):
    data = marked_volume()
    volume = load_volume(write(tmp_path / "v.nii.gz", data, slope=2.0, inter=10.0))
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.data, data * 2.0 + 10.0)


def test_single_volume_4d_is_squeezed_and_multi_volume_needs_an_index(tmp_path):
    data = marked_volume()
    single = load_volume(write(tmp_path / "one.nii.gz", data[..., None]))
    np.testing.assert_array_equal(single.data, data)
    two = write(tmp_path / "two.nii.gz", np.stack([data, data + 1], axis=-1))
    with pytest.raises(UBCInputError, match=r"two\.nii\.gz.*2 volumes"):
        load_volume(two)
    np.testing.assert_array_equal(load_volume(two, volume_index=1).data, data + 1)


def test_gzip_and_plain_files_load_the_same(tmp_path):
    data = marked_volume(dtype=np.float32)
    plain = load_volume(write(tmp_path / "v.nii", data, zooms=(0.5, 0.7, 2.0)))
    packed = load_volume(write(tmp_path / "v.nii.gz", data, zooms=(0.5, 0.7, 2.0)))
    np.testing.assert_array_equal(plain.data, packed.data)
    assert plain.spacing == packed.spacing == pytest.approx((0.5, 0.7, 2.0))


def test_truncated_gzip_is_reported_with_the_file_name(tmp_path):
    good = write(tmp_path / "good.nii.gz", marked_volume())
    raw = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UBCInputError, match=r"truncated\.nii\.gz.*(corrupt|truncated)"):
        load_volume(bad)


def test_corrupt_gzip_and_non_nifti_files_are_reported(tmp_path):
    rng = np.random.default_rng(0)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00" + rng.bytes(5000))
    noise = tmp_path / "noise.nii.gz"
    noise.write_bytes(rng.bytes(5000))
    text = tmp_path / "notes.nii.gz"
    text.write_bytes(gzip.compress(b"this is a radiology report, not an image\n" * 20))
    with pytest.raises(UBCInputError, match=r"corrupt\.nii\.gz: corrupt or truncated gzip"):
        load_volume(corrupt)
    for path in (noise, text):
        with pytest.raises(UBCInputError, match=rf"{path.name}: not a NIfTI file|"
                                                rf"{path.name}: cannot read as NIfTI"):
            load_volume(path)


def test_missing_file_and_2d_image_are_reported(tmp_path):
    with pytest.raises(UBCInputError, match=r"absent\.nii\.gz: file not found"):
        load_volume(tmp_path / "absent.nii.gz")
    flat = write(tmp_path / "flat.nii.gz", np.ones((10, 10), np.int16))
    with pytest.raises(UBCInputError, match=r"flat\.nii\.gz.*3-D"):
        load_volume(flat)


@pytest.mark.parametrize("affine", [RAS, np.diag([-1.0, -1.0, 1.0, 1.0]),
                                    np.array([[0, 2.0, 0, 0], [-1.0, 0, 0, 0],
                                              [0, 0, 3.0, 0], [0, 0, 0, 1]])],
                         ids=["RAS", "LPS", "swap"])
def test_mask_is_saved_in_the_input_grid(tmp_path, affine):
    data = marked_volume()
    volume = load_volume(write(tmp_path / "v.nii.gz", data, affine=affine))
    mask = (volume.data % 7 == 0).astype(np.uint8)  # defined on the canonical grid
    saved = nib.load(save_mask(mask, volume, tmp_path / "mask.nii.gz"))
    np.testing.assert_allclose(saved.affine, affine)
    stored = np.asanyarray(saved.dataobj)
    assert stored.shape == data.shape and stored.dtype == np.uint8
    np.testing.assert_array_equal(stored, (data % 7 == 0).astype(np.uint8))
    assert not list(tmp_path.glob(".*tmp*"))


def test_mask_files_are_the_one_deterministic_encoding(tmp_path):
    volume = load_volume(write(tmp_path / "v.nii.gz", marked_volume()))
    mask = (volume.data % 7 == 0).astype(np.uint8)
    stored = volume.to_original_orientation(mask)
    for name, compress in (("m.nii.gz", True), ("m.nii", False)):
        expected = encode_mask(stored, volume.original_affine, compress=compress)
        assert save_mask(mask, volume, tmp_path / name).read_bytes() == expected
    with pytest.raises(ValueError, match=r"m\.img: .*name it \.nii\.gz"):
        save_mask(mask, volume, tmp_path / "m.img")


def test_masks_are_the_bytes_nibabel_writes():
    """The header is nibabel's, the voxels are written without its chunked copy: the file is
    byte for byte what nibabel's to_bytes gives, for integer and float masks in any layout."""
    affine = np.array([[-1.1, 0, 0, 239], [0, -0.9, 0.1, 239], [0, 0, 1.3, -5], [0, 0, 0, 1]])
    labels = (marked_volume() % 5 == 0)[:40, :30, :20]
    for mask in (labels, np.asfortranarray(labels.astype(np.int64)), labels[::-1, :, ::2],
                 labels * np.float64(0.25), np.asfortranarray(labels, np.float32)):
        dtype = np.float32 if mask.dtype.kind == "f" else np.uint8
        image = nib.Nifti1Image(np.asarray(mask, dtype=dtype), affine)
        image.header.set_xyzt_units("mm")
        assert encode_mask(mask, affine, compress=False) == image.to_bytes()


@pytest.mark.real
def test_real_volumes_load_in_canonical_orientation(real_volume_paths):
    for key in ("brats_flair", "tcga_flair", "tcga_seg"):
        volume = load_volume(real_volume_paths[key])
        assert volume.data.shape == (240, 240, 155)
        assert volume.spacing == (1.0, 1.0, 1.0)
        assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
        assert nib.aff2axcodes(volume.original_affine) == ("L", "P", "S")
        assert volume.data.dtype in (np.int16, np.uint8)


SEED_CORPUS = Path(__file__).parent / "fuzz" / "corpus" / "nifti"


NOT_SCALAR = ("complex64.nii", "complex128.nii", "rgb24.nii")


@pytest.mark.parametrize("name", sorted(p.name for p in SEED_CORPUS.iterdir()
                                        if p.name not in NOT_SCALAR))
def test_every_nifti_dtype_and_layout_loads_as_nibabel_reads_it(name):
    # The bounded reader (issue 9) builds voxels itself; nibabel's reading is the reference.
    path = SEED_CORPUS / name
    image = nib.load(path)
    proxy = image.dataobj
    scaled = not (proxy.slope == 1 and proxy.inter == 0)
    expected = image.get_fdata(dtype=np.float32) if scaled else np.asanyarray(proxy)
    if expected.ndim == 4:
        expected = expected[..., 0]
    volume = load_volume(path, volume_index=0)
    from ubc.io.volume import native_voxels  # in the byte order and a type preprocessing reads

    assert volume.data.dtype == native_voxels(expected).dtype
    np.testing.assert_array_equal(volume.to_original_orientation(volume.data), expected)
    np.testing.assert_array_equal(volume.original_affine, image.affine)
    assert sorted(volume.spacing) == pytest.approx(sorted(image.header.get_zooms()[:3]))


@pytest.mark.parametrize("name", NOT_SCALAR)
def test_complex_and_rgb_files_are_refused_by_name(name):
    # No scalar intensity: downstream casts would drop the imaginary part or fail on tuples.
    with pytest.raises(UBCInputError, match=rf"{name}: header datatype \d+ .* not a scalar"):
        load_volume(SEED_CORPUS / name)


def test_bytes_in_memory_load_as_the_file_does(tmp_path):
    from ubc.io import load_volume_bytes

    path = tmp_path / "scan.nii.gz"
    data = (np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10) % 97)
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, 1.0, 2.0, 1.0])), path)
    raw = path.read_bytes()
    for payload in (raw, gzip.decompress(raw)):  # .nii.gz and .nii, told apart by content
        volume, expected = load_volume_bytes(payload, name="upload-7"), load_volume(path)
        assert np.array_equal(volume.data, expected.data) and volume.path is None
        assert np.allclose(volume.affine, expected.affine)
        assert volume.spacing == expected.spacing
    with pytest.raises(UBCInputError, match="^upload-7: corrupt or truncated gzip"):
        load_volume_bytes(raw[:200], name="upload-7")
    with pytest.raises(UBCInputError, match="^<upload>: .*truncated"):
        load_volume_bytes(gzip.decompress(raw)[:400])


def test_file_kind_reads_the_content_not_the_name(tmp_path: Path) -> None:
    import zipfile

    import nrrd

    from ubc.io.sniff import NIFTI, NRRD, ZIP, file_kind

    data = marked_volume()
    for name, header in (("a.bin", nib.Nifti1Image), ("b.dat", nib.Nifti2Image)):
        nib.save(header(data, RAS), tmp_path / f"{name}.nii")
        (tmp_path / name).write_bytes((tmp_path / f"{name}.nii").read_bytes())
    (tmp_path / "c.x").write_bytes(gzip.compress((tmp_path / "a.bin").read_bytes()))
    nrrd.write(str(tmp_path / "d.nrrd"), data)
    (tmp_path / "d.y").write_bytes((tmp_path / "d.nrrd").read_bytes())
    with zipfile.ZipFile(tmp_path / "e.nii.gz", "w") as archive:
        archive.writestr("x.txt", "x")
    (tmp_path / "f.nii.gz").write_text("this is not an image\n")
    kinds = {name: file_kind(tmp_path / name)
             for name in ("a.bin", "b.dat", "c.x", "d.y", "e.nii.gz", "f.nii.gz")}
    assert kinds == {"a.bin": NIFTI, "b.dat": NIFTI, "c.x": NIFTI, "d.y": NRRD,
                     "e.nii.gz": ZIP, "f.nii.gz": None}


@pytest.mark.parametrize("affine", [np.diag([-1.0, -1.0, 1.0, 1.0]),  # LPS, as most exports
                                    np.array([[0, 0, 1.0, 0], [-1.0, 0, 0, 0],
                                              [0, 1.0, 0, 0], [0, 0, 0, 1.0]])])
def test_a_mask_written_through_the_stored_layout_needs_no_reorienting_copy(
        tmp_path: Path, affine: np.ndarray) -> None:
    """A mask resampled into ``stored_layout`` on the canonical grid holds the voxels of the
    default (canonical Fortran) output, and maps back to the file's axes as a Fortran-
    contiguous view of that very buffer: saved as it lies, the same file."""
    from ubc import preprocess
    from ubc.io.volume import canonical_volume

    volume = canonical_volume(np.zeros((50, 60, 20), np.int16, order="F"), affine,
                              (1.0, 1.2, 2.0), None)
    probs = np.random.default_rng(0).random((volume.data.shape[2], 32, 32)).astype(np.float16)
    def resampled(out: np.ndarray | None) -> np.ndarray:
        return preprocess.to_original(probs, volume.data.shape, volume.spacing,
                                      target_spacing=(2.0, 2.0), threshold=0.5, out=out)

    plain, laid = resampled(None), resampled(volume.stored_layout(np.uint8))
    assert np.array_equal(plain, laid) and plain.any()
    stored = volume.to_original_orientation(laid)
    assert stored.flags.f_contiguous and stored.shape == volume.original_shape
    assert np.shares_memory(stored, laid)
    save_mask(plain, volume, tmp_path / "plain.nii.gz")
    save_mask(laid, volume, tmp_path / "laid.nii.gz")
    assert (tmp_path / "plain.nii.gz").read_bytes() == (tmp_path / "laid.nii.gz").read_bytes()
