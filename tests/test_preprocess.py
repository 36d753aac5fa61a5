"""The native preprocessor against its NumPy reference, geometry facts, threads and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubc import preprocess as native
from ubc import preprocess_reference as reference

DTYPES = [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64]
# (spacing, target_spacing, size): identity-ish crop, pad, up- and down-sampling, anisotropy
GEOMETRIES = [
    ((1.0, 1.0, 1.0), (1.0, 1.0), (32, 32)),
    ((1.0, 1.0, 1.0), (1.0, 1.0), (64, 96)),
    ((0.5, 0.5, 3.0), (1.0, 1.0), (32, 32)),
    ((2.0, 1.5, 1.0), (1.0, 1.0), (96, 64)),
    ((0.7, 1.3, 2.0), (1.1, 0.9), (32, 96)),
]


def random_volume(shape, dtype, rng, order="C", background=0.3):
    """Values in a dtype-safe range, with a share of exact-zero background voxels."""
    high = 200 if dtype == np.uint8 else 3000
    values = rng.uniform(1, high, size=shape)
    values[rng.random(shape) < background] = 0
    if np.issubdtype(dtype, np.integer):
        values = np.round(values)
    return np.asarray(values.astype(dtype), order=order)


def layouts(volume):
    """C order, Fortran order, and a non-contiguous flipped view of the same voxels."""
    big = np.zeros((volume.shape[0] * 2, volume.shape[1], volume.shape[2] + 1), volume.dtype)
    big[::2, :, 1:] = volume[::-1]
    return {
        "C": np.ascontiguousarray(volume),
        "F": np.asfortranarray(volume),
        "strided": big[::2, :, 1:][::-1],
    }


def assert_matches_reference(volume, spacing, target_spacing, size, norm):
    got = native.slices(volume, spacing, size=size, target_spacing=target_spacing, norm=norm)
    want = reference.slices(volume, spacing, size=size, target_spacing=target_spacing, norm=norm)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert got.flags.c_contiguous
    scale = 1.0 if norm != "none" else max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("norm", ["zscore", "percentile", "none"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}->{g[1]}@{g[2]}")
def test_slices_match_reference(dtype, layout, norm, geometry):
    rng = np.random.default_rng(7)
    volume = layouts(random_volume((37, 45, 6), dtype, rng))[layout]
    spacing, target_spacing, size = geometry
    assert_matches_reference(volume, spacing, target_spacing, size, norm)


@settings(max_examples=40, deadline=None)
@given(nx=st.integers(3, 50), ny=st.integers(3, 50), nz=st.integers(1, 5),
       sx=st.floats(0.3, 3.0), sy=st.floats(0.3, 3.0), tx=st.floats(0.5, 2.0),
       ty=st.floats(0.5, 2.0), h=st.sampled_from([32, 64]), w=st.sampled_from([32, 64]),
       dtype=st.sampled_from(DTYPES), norm=st.sampled_from(["zscore", "percentile"]),
       seed=st.integers(0, 2**16))
def test_slices_match_reference_property(nx, ny, nz, sx, sy, tx, ty, h, w, dtype, norm, seed):
    rng = np.random.default_rng(seed)
    volume = random_volume((nx, ny, nz), dtype, rng, background=0.2)
    if len(np.unique(volume[volume != 0])) < 2:
        volume.flat[:2] = [1, 2]  # keep the foreground non-constant
    assert_matches_reference(volume, (sx, sy, 1.0), (tx, ty), (h, w), norm)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}->{g[1]}@{g[2]}")
def test_mask_slices_and_areas_match_reference(dtype, geometry):
    rng = np.random.default_rng(3)
    labels = (rng.integers(0, 5, size=(33, 41, 5)) * (rng.random((33, 41, 5)) < 0.4)).astype(dtype)
    spacing, target_spacing, size = geometry
    for volume in layouts(labels).values():
        got = native.mask_slices(volume, spacing, size=size, target_spacing=target_spacing)
        want = reference.mask_slices(volume, spacing, size=size, target_spacing=target_spacing)
        assert got.dtype == np.uint8 and np.array_equal(got, want)
        np.testing.assert_array_equal(native.lesion_areas(volume, spacing),
                                      reference.lesion_areas(volume, spacing))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}->{g[1]}@{g[2]}")
def test_to_original_matches_reference(geometry):
    spacing, target_spacing, size = geometry
    rng = np.random.default_rng(5)
    values = rng.random((4, *size)).astype(np.float32)
    shape, indices = (29, 35, 9), [0, 3, 4, 8]
    got = native.to_original(values, shape, spacing, target_spacing=target_spacing,
                             slice_indices=indices)
    want = reference.to_original(values, shape, spacing, target_spacing=target_spacing,
                                 slice_indices=indices)
    assert got.shape == shape and got.flags.f_contiguous
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not got[:, :, [1, 2, 5, 6, 7]].any()


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}->{g[1]}@{g[2]}")
def test_to_original_with_a_threshold_is_the_thresholded_float_volume(geometry):
    """The binary mask path gives the voxels of thresholding the float one: slices that
    stay below the threshold, values at it, and outputs far from the values that reach it
    (none of them resampled) included."""
    spacing, target_spacing, size = geometry
    rng = np.random.default_rng(6)
    values = (rng.random((6, *size)) ** 3).astype(np.float32)
    values[1] = 0.4999999  # below: skipped; values[2] at the threshold: resampled, all 0
    values[2], values[3] = 0.5, 0.0
    values[4, 0, 0] = 0.9  # one hot pixel on an otherwise empty slice
    values[4, 1:] = 0.0
    h, w = size[0] // 2, size[1] // 2  # a blob inside a halo just below the threshold:
    values[5] = 0.0                    # only the outputs around the blob are resampled
    values[5, h - 2:h + 3, w - 2:w + 2] = 0.4999
    values[5, h - 1:h + 2, w - 1:w + 1] = 0.8
    shape, indices = (29, 35, 9), [0, 3, 4, 8, 1, 6]
    for threads in (1, 2):
        floats = native.to_original(values, shape, spacing, target_spacing=target_spacing,
                                    slice_indices=indices, threads=threads)
        mask = native.to_original(values, shape, spacing, target_spacing=target_spacing,
                                  slice_indices=indices, threads=threads, threshold=0.5)
        assert mask.dtype == np.uint8 and mask.flags.f_contiguous and mask.shape == shape
        np.testing.assert_array_equal(mask, (floats > 0.5).astype(np.uint8))
        halves = values.astype(np.float16)  # read as they are: the same as their float32
        np.testing.assert_array_equal(
            native.to_original(halves, shape, spacing, target_spacing=target_spacing,
                               slice_indices=indices, threads=threads, threshold=0.5),
            native.to_original(halves.astype(np.float32), shape, spacing,
                               target_spacing=target_spacing, slice_indices=indices,
                               threads=threads, threshold=0.5))
    assert mask[:, :, 0].any() and mask[:, :, 6].any()
    assert not mask[:, :, [2, 3, 5, 7, 8]].any()


def test_slice_indices_select_the_same_slices():
    volume = random_volume((40, 40, 10), np.int16, np.random.default_rng(1))
    every = native.slices(volume, (1, 1, 1), size=(32, 32))
    some = native.slices(volume, (1, 1, 1), size=(32, 32), slice_indices=[7, 2, 2])
    np.testing.assert_array_equal(some, every[[7, 2, 2]])


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("size", [(64, 64), (32, 96)], ids=["aligned", "resampled"])
def test_runs_of_slice_indices_in_any_order_select_the_same_slices(layout, size):
    """Consecutive slices are read together (z-fastest volumes by runs of 16, the remainder
    first): runs up and down, of every length around 16 and 32, repeats and singles."""
    volume = layouts(random_volume((40, 41, 70), np.int16, np.random.default_rng(3)))[layout]
    spacing = (1, 1, 1) if size == (64, 64) else (0.9, 1.0, 1.0)
    every = native.slices(volume, spacing, size=size)
    indices = [*range(0, 17), *range(40, 7, -1), 3, 3, 69, *range(35, 68), 50, *range(20, 36)]
    for threads in (1, 3):
        some = native.slices(volume, spacing, size=size, slice_indices=indices, threads=threads)
        assert some.tobytes() == every[indices].tobytes()


def exact_stats(volume: np.ndarray, norm: str) -> tuple[float, float]:
    """(offset, scale) of an integer volume as the native core defines them: the z-score from
    the exact count, sum and sum of squares of the foreground, the percentiles as NumPy's
    linear ones, low + (high - low) * fraction, evaluated in double precision."""
    if norm == "none":
        return 0.0, 1.0
    foreground = np.sort(volume[volume != 0].astype(np.int64))
    n = foreground.size
    if norm == "zscore":
        total, squares = int(foreground.sum()), int((foreground * foreground).sum())
        variance = float(n * squares - total * total) / (float(n) * float(n))
        return total / n, 1.0 / math.sqrt(variance)  # int / int rounds once, as the core does

    def percentile(q: float) -> float:
        position = q * (n - 1)
        rank = math.floor(position)
        low = float(foreground[rank])
        high = float(foreground[rank + 1]) if rank + 1 < n else low
        return low + (high - low) * (position - rank)

    low, high = percentile(0.005), percentile(0.995)
    return low, 1.0 / (high - low)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("norm", ["zscore", "percentile", "none"])
def test_every_8_and_16_bit_value_normalises_to_the_exact_float(dtype, norm):
    """Every representable voxel value, in every layout, on 1 and 3 threads, cropped or padded,
    becomes exactly float32((v - offset) * scale) computed in double precision (clipped to
    [0, 1] for percentile), and 0 stays 0: vectorised, the normalisation keeps every bit."""
    info = np.iinfo(dtype)
    values = np.arange(int(info.min), int(info.max) + 1).astype(dtype)
    volume = np.random.default_rng(13).permutation(np.resize(values, 64 * 64 * 16))
    volume = volume.reshape(64, 64, 16)
    offset, scale = exact_stats(volume, norm)
    normalised = (volume.astype(np.float64) - offset) * scale
    if norm == "percentile":
        normalised = np.clip(normalised, 0.0, 1.0)
    want = np.where(volume == 0, 0.0, normalised).astype(np.float32).transpose(2, 0, 1)[:, None]
    padded = np.zeros((16, 1, 96, 32), np.float32)  # x padded by 16 each side, y cropped by 16
    padded[:, :, 16:80] = want[..., 16:48]
    variants = {**layouts(volume),
                "y fastest": np.ascontiguousarray(volume.transpose(2, 0, 1)).transpose(1, 2, 0)}
    for layout, v in variants.items():
        for threads in (1, 3):
            for size, expected in (((64, 64), want), ((96, 32), padded)):
                got = native.slices(v, (1, 1, 1), size=size, norm=norm, threads=threads)
                assert got.view(np.uint32).tobytes() == expected.view(np.uint32).tobytes(), \
                    (layout, threads, size)


def test_out_buffer_is_filled_and_returned():
    volume = random_volume((40, 40, 6), np.int16, np.random.default_rng(2))
    out = np.full((6, 1, 32, 32), np.nan, np.float32)
    result = native.slices(volume, (1, 1, 1), size=(32, 32), out=out)
    assert result is out
    np.testing.assert_array_equal(out, native.slices(volume, (1, 1, 1), size=(32, 32)))
    with pytest.raises(ValueError, match="out must be"):
        native.slices(volume, (1, 1, 1), size=(32, 32), out=np.empty((6, 1, 32, 33), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        native.slices(volume, (1, 1, 1), size=(32, 32), out=np.empty((6, 1, 32, 32), np.float64))


def test_identity_geometry_returns_the_normalised_input():
    volume = random_volume((64, 96, 5), np.int16, np.random.default_rng(4))
    got = native.slices(volume, (0.8, 0.8, 2.0), size=(64, 96), target_spacing=(0.8, 0.8))
    want = reference.normalise(volume, "zscore").transpose(2, 0, 1)[:, None]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.array_equal(got[:, 0] == 0, (volume == 0).transpose(2, 0, 1))


def test_identity_geometry_round_trips_through_to_original():
    volume = random_volume((64, 64, 4), np.float32, np.random.default_rng(8))
    model_grid = native.slices(volume, (1, 1, 1), size=(64, 64))
    back = native.to_original(model_grid, volume.shape, (1, 1, 1))
    np.testing.assert_allclose(back, reference.normalise(volume), atol=1e-6)


@pytest.mark.parametrize("shape", [(41, 41), (40, 40), (100, 61)])
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 0.9), (2.0, 1.3)])
def test_volume_centre_lands_at_output_centre(shape, spacing):
    # A bright plus-shaped blob centred on the slice centre, on a dim non-zero background.
    volume = np.ones((*shape, 1), np.float32)
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    volume[..., 0] += 100 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 8.0)
    out = native.slices(volume, (*spacing, 1.0), size=(64, 96), norm="none")[0, 0]
    weights = np.clip(out - 1.0, 0, None)
    centroid = [(weights * np.arange(n).reshape(shp)).sum() / weights.sum()
                for n, shp in ((64, (-1, 1)), (96, (1, -1)))]
    np.testing.assert_allclose(centroid, [31.5, 47.5], atol=0.05)


def test_linear_ramp_stays_linear_with_the_right_slope():
    # Intensity grows 3 units per mm along x; resampled from 0.5 mm to 1 mm it must grow
    # 3 units per output pixel (1 mm), everywhere inside the field of view.
    nx = 200
    ramp = 1000 + 3 * 0.5 * np.arange(nx, dtype=np.float64)
    volume = np.repeat(ramp[:, None, None], 50, axis=1).repeat(2, axis=2)
    out = native.slices(volume, (0.5, 0.5, 1.0), size=(64, 32), target_spacing=(1.0, 1.0),
                        norm="none")[0, 0]
    steps = np.diff(out[:, 10])
    np.testing.assert_allclose(steps, 3.0, rtol=1e-5)
    np.testing.assert_allclose(out[:, 0], out[:, 31])


def test_zscore_statistics_are_over_the_foreground():
    rng = np.random.default_rng(9)
    volume = random_volume((50, 50, 8), np.int16, rng, background=0.6)
    out = native.slices(volume, (1, 1, 1), size=(64, 64))
    foreground = out[out != 0]
    assert abs(foreground.mean()) < 1e-4 and abs(foreground.std() - 1) < 1e-4
    assert np.count_nonzero(out) == np.count_nonzero(volume)


def test_percentile_norm_is_clipped_to_unit_range():
    volume = random_volume((50, 50, 4), np.float32, np.random.default_rng(10))
    volume[0, 0, 0] = 1e6  # an outlier is clipped, not allowed to squash the range
    out = native.slices(volume, (1, 1, 1), size=(64, 64), norm="percentile")
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.median(out[out > 0]) > 0.3


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("layout", ["F", "C"])
def test_threads_give_identical_bytes(dtype, layout):
    volume = layouts(random_volume((71, 53, 23), dtype, np.random.default_rng(11)))[layout]
    for norm in ("zscore", "percentile"):
        runs = [native.slices(volume, (0.9, 1.1, 1.0), size=(64, 64), norm=norm, threads=t)
                for t in (1, 2, 3, 8)]
        assert all(r.tobytes() == runs[0].tobytes() for r in runs[1:])
    masks = [native.mask_slices(volume, (0.9, 1.1, 1.0), size=(64, 64), threads=t) for t in (1, 5)]
    assert masks[0].tobytes() == masks[1].tobytes()


def test_big_endian_and_bool_inputs_are_read_correctly():
    volume = random_volume((40, 40, 3), np.int16, np.random.default_rng(12))
    swapped = volume.astype(">i2")
    np.testing.assert_array_equal(native.slices(swapped, (1, 1, 1), size=(32, 32)),
                                  native.slices(volume, (1, 1, 1), size=(32, 32)))
    np.testing.assert_array_equal(native.mask_slices(volume > 1000, (1, 1, 1), size=(32, 32)),
                                  native.mask_slices(volume * (volume > 1000), (1, 1, 1),
                                                     size=(32, 32)))


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_foreground_counts_per_axial_slice(dtype):
    """Per slice, in every layout (Fortran order's contiguous rows counted apart), -0 as 0."""
    volume = random_volume((30, 20, 7), dtype, np.random.default_rng(13))
    volume[:, :, 3] = 0
    volume[:5, :, 4] = -0.0 if dtype == np.float32 else 0
    for layout in layouts(volume).values():
        counts = native.foreground_counts(layout)
        np.testing.assert_array_equal(counts, np.count_nonzero(volume, axis=(0, 1)))
        assert counts[3] == 0


GOOD = np.arange(1, 8 * 8 * 3 + 1, dtype=np.float32).reshape(8, 8, 3)


@pytest.mark.parametrize(("volume", "kwargs", "error", "match"), [
    (GOOD[..., 0], {}, ValueError, "3-D"),
    (np.zeros((0, 8, 3), np.float32), {}, ValueError, "empty axis"),
    (GOOD.astype(np.complex64), {}, TypeError, "unsupported volume dtype"),
    (GOOD.astype(np.int64), {}, TypeError, "astype"),
    ([[[1.0]]], {}, TypeError, "numpy array"),
    (GOOD, {"spacing": (1.0, 0.0, 1.0)}, ValueError, "spacing must be finite and positive"),
    (GOOD, {"spacing": (1.0, np.nan, 1.0)}, ValueError, "spacing must be finite and positive"),
    (GOOD, {"target_spacing": (-1.0, 1.0)}, ValueError, "target_spacing"),
    (GOOD, {"spacing": (1.0, 1.0)}, ValueError, r"spacing \(x, y, z\) in mm must have 3"),
    (GOOD, {"target_spacing": (1.0,)}, ValueError, "target_spacing .* must have 2"),
    (GOOD, {"size": (225, 224)}, ValueError, r"multiple of 32.*use \(224, 224\)"),
    (GOOD, {"size": (16, 32)}, ValueError, "out of range"),
    (GOOD, {"size": (65536, 32)}, ValueError, "out of range"),
    (GOOD, {"norm": "minmax"}, ValueError, "norm must be one of"),
    (GOOD, {"slice_indices": [0, 3]}, ValueError, "slice index 3 is out of range"),
    (GOOD, {"slice_indices": [-1]}, ValueError, "out of range"),
    (GOOD, {"threads": -1}, ValueError, "threads"),
    (np.where(GOOD > 5, GOOD, np.nan).astype(np.float32), {}, ValueError, "5 NaN/Inf voxels"),
    (np.where(GOOD > 5, GOOD, np.inf), {"norm": "none"}, ValueError, "NaN/Inf"),
    (np.zeros((8, 8, 3), np.int16), {}, ValueError, "no foreground"),
    (np.zeros((8, 8, 3), np.float32), {"norm": "percentile"}, ValueError, "no foreground"),
    (np.full((8, 8, 3), 7, np.int16), {}, ValueError, "constant"),
    (np.full((8, 8, 3), 7.5), {"norm": "percentile"}, ValueError, "constant"),
])
def test_bad_input_raises_a_clear_error(volume, kwargs, error, match):
    args = {"spacing": (1.0, 1.0, 1.0), "size": (32, 32), **kwargs}
    spacing = args.pop("spacing")
    with pytest.raises(error, match=match):
        native.slices(volume, spacing, **args)


def test_constant_volume_is_fine_without_normalisation():
    out = native.slices(np.full((8, 8, 2), 7, np.int16), (1, 1, 1), size=(32, 32), norm="none")
    assert out.max() == 7.0


def test_to_original_rejects_mismatched_arguments():
    values = np.zeros((2, 32, 32), np.float32)
    with pytest.raises(ValueError, match="slice indices"):
        native.to_original(values, (10, 10, 5), (1, 1, 1), slice_indices=[1])
    with pytest.raises(ValueError, match="out of range"):
        native.to_original(values, (10, 10, 5), (1, 1, 1), slice_indices=[1, 5])
    with pytest.raises(ValueError, match="original_shape"):
        native.to_original(values, (10, 10), (1, 1, 1))


@pytest.mark.real
def test_real_brats_volume(real_volume_paths):
    from ubc.io import load_volume

    volume = load_volume(real_volume_paths["brats_flair"])
    out = native.slices(volume.data, volume.spacing, size=(224, 224))
    assert out.shape == (155, 1, 224, 224)
    counts = native.foreground_counts(volume.data)
    assert counts[0] == 0 and counts[77] > 10_000  # empty top/bottom slices, brain in between
    assert not out[counts == 0].any()
    brain = out[out != 0]
    assert abs(brain.mean()) < 0.05 and 0.9 < brain.std() < 1.1
    np.testing.assert_allclose(out[60:62], reference.slices(volume.data, volume.spacing,
                                                            slice_indices=[60, 61]), atol=1e-5)


@pytest.mark.real
def test_real_tcga_mask_and_areas(real_volume_paths):
    from ubc.io import load_volume

    seg = load_volume(real_volume_paths["tcga_seg"])
    areas = native.lesion_areas(seg.data, seg.spacing)
    top5 = np.argsort(areas)[::-1][:5]
    assert areas[top5[0]] > 100  # mm2: the consensus segmentation has a real lesion
    masks = native.mask_slices(seg.data, seg.spacing, slice_indices=top5)
    # 1 mm grid, 240 -> 224 centre crop: the mask area is kept up to the cropped border
    assert np.all(np.abs(masks.sum(axis=(1, 2, 3)) - areas[top5]) <= 0.05 * areas[top5])
    flair = load_volume(real_volume_paths["tcga_flair"])  # negative values are foreground
    assert (flair.data < 0).any()
    out = native.slices(flair.data, flair.spacing)
    assert np.count_nonzero(out) == np.count_nonzero(flair.data[8:232, 8:232])


# Downsampling integrates over the output pixel's footprint (issue 10): no decimation.
def test_nyquist_checkerboard_downsampled_3x_is_near_constant():
    x, y = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    board = (2.0 + (-1.0) ** (x + y))[..., None].repeat(2, axis=2)  # 1 and 3: no background
    for module in (native, reference):
        out = module.slices(board, (1.0, 1.0, 1.0), size=(32, 32), target_spacing=(3.0, 3.0),
                            norm="none")[:, 0, 2:-2, 2:-2]
        # A triangle of half-width 3 passes (1/9)^2 of the Nyquist amplitude (decimation: all).
        np.testing.assert_allclose(out, 2.0, atol=0.02)


@pytest.mark.parametrize(("factor", "n_in", "kept"), [
    (3.0, 192, (19 / 81) ** 2),  # integer centres: weights (1, 2, 3, 2, 1) / 9 per axis
    (2.0, 128, (20 / 64) ** 2),  # half-integer centres: weights (1, 3, 3, 1) / 8 per axis
])
def test_white_noise_downsampled_loses_variance_as_expected(factor, n_in, kept):
    rng = np.random.default_rng(21)
    noise = rng.normal(100.0, 10.0, size=(n_in, n_in, 8))
    out = native.slices(noise, (1.0, 1.0, 1.0), size=(64, 64), target_spacing=(factor, factor),
                        norm="none")[:, 0, 2:-2, 2:-2]
    ratio = out.var() / noise.var()
    assert ratio == pytest.approx(kept, rel=0.08)
    assert out.mean() == pytest.approx(100.0, abs=0.1)


def test_upsampling_and_equal_spacing_stay_bilinear():
    volume = random_volume((40, 36, 3), np.float32, np.random.default_rng(22))
    for spacing, target in (((1.0, 1.0, 1.0), (1.0, 1.0)), ((2.0, 1.5, 1.0), (1.0, 0.5))):
        got = native.slices(volume, spacing, size=(64, 64), target_spacing=target, norm="none")
        coords = [reference.source_coords(64, n, s, t) for n, s, t in
                  zip(volume.shape[:2], spacing[:2], target, strict=True)]
        wx, wy = (reference._bilinear_weights(c, n) for c, n in
                  zip(coords, volume.shape[:2], strict=True))
        want = np.stack([wx @ volume[:, :, k] @ wy.T for k in range(3)])[:, None]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-3)


def _footprint_weights(n_out, n_in, spacing, target):
    """Each output's first input index and float32 weights, computed as the native core
    computes them (double, in the same order; resample.cpp's footprint_kernel)."""
    ratio = target / spacing
    kernel = []
    for o in range(n_out):
        centre = (o - (n_out - 1) * 0.5) * (target / spacing) + (n_in - 1) * 0.5
        first, last = float(math.ceil(centre - ratio)), float(math.floor(centre + ratio))
        total, j = 0.0, first
        while j <= last:
            total += 1.0 - abs(j - centre) / ratio
            j += 1.0
        j, weights = max(first, 0.0), []
        while j <= min(last, n_in - 1.0):
            weights.append(np.float32((1.0 - abs(j - centre) / ratio) / total))
            j += 1.0
        kernel.append((int(max(first, 0.0)), weights))
    return kernel


@pytest.mark.parametrize(("shape", "spacing", "target", "size"), [
    ((240, 240), (1.0, 1.0), (2.0, 2.0), (64, 64)),    # BraTS at the demo's grid: the centre
    ((240, 240), (1.0, 1.0), (2.0, 2.0), (224, 224)),  # BraTS at 224: zeros around the head
    ((37, 50), (1.0, 0.9), (2.0, 1.7), (32, 64)),
])
def test_downsampling_keeps_the_bits_of_a_sum_per_pixel(shape, spacing, target, size):
    """Bit for bit what summing each pixel's taps in order gives: the input rows of an output
    row first, then that row's columns, in float32 from 0 (the native core reorders the
    loops, never the sums)."""
    volume = np.random.default_rng(31).normal(0.0, 100.0, (*shape, 2)).astype(np.float32)
    volume[:10] = 0.0
    got = native.slices(volume, (*spacing, 1.0), size=size, target_spacing=target, norm="none")
    rows = _footprint_weights(size[0], shape[0], spacing[0], target[0])
    cols = _footprint_weights(size[1], shape[1], spacing[1], target[1])
    for z in range(volume.shape[2]):
        padded = np.zeros((shape[0] + 2, shape[1] + 2), np.float32)
        padded[1:-1, 1:-1] = volume[:, :, z]
        combined = np.zeros((size[0], shape[1] + 2), np.float32)
        for h, (start, weights) in enumerate(rows):
            for t, w in enumerate(weights):
                combined[h] += w * padded[start + t + 1]
        want = np.zeros(size, np.float32)
        for c, (start, weights) in enumerate(cols):
            for t, w in enumerate(weights):
                want[:, c] += w * combined[:, start + t + 1]
        assert np.array_equal(got[z, 0].view(np.uint32), want.view(np.uint32))
