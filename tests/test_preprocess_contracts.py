"""The native core's own contracts (issue 9), through ``ubc.preprocess`` and its binding:
bounded sizes, NaN-proof spacing checks, a bounded ``to_original``, no write races, and ``out``
buffers refused (never silently converted) when they are not exactly what is written."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import ubc._native as _native
from ubc import preprocess as native
from ubc import preprocess_reference as reference


def ramp_volume(shape=(40, 36, 5), dtype=np.int16):
    values = 1 + np.arange(np.prod(shape)).reshape(shape) % 97
    values[:3] = 0  # some background
    return values.astype(dtype)


def misaligned(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` at an odd byte offset of a buffer: numpy calls it unaligned."""
    buffer = bytearray(array.nbytes + 1)
    view = np.ndarray(array.shape, array.dtype, buffer=buffer, offset=1)
    view[...] = array
    assert not view.flags.aligned
    return view


# 1. Size products: a huge view of a one-byte buffer is refused before anything is allocated.
ONE_BYTE = np.zeros(1, np.uint8)
HUGE_VIEW = as_strided(ONE_BYTE, shape=(2**30, 2**30, 1), strides=(0, 0, 0), writeable=False)


@pytest.mark.parametrize("call", [
    lambda v: native.slices(v, (1, 1, 1), size=(32, 32), norm="none"),
    lambda v: native.mask_slices(v, (1, 1, 1), size=(32, 32)),
    lambda v: native.lesion_areas(v, (1, 1, 1)),
    lambda v: native.foreground_counts(v),
], ids=["slices", "mask_slices", "lesion_areas", "foreground_counts"])
def test_views_beyond_the_core_limits_are_refused(call):
    with pytest.raises(ValueError, match="beyond the native core's limits"):
        call(HUGE_VIEW)
    too_wide = as_strided(ONE_BYTE, shape=(4097, 4096, 1), strides=(0, 0, 0), writeable=False)
    with pytest.raises(ValueError, match="per axial slice"):
        native.slices(too_wide, (1, 1, 1), size=(32, 32), norm="none")


def test_large_zero_stride_view_within_the_limits_is_read_in_bounded_blocks():
    column = np.arange(1, 4, dtype=np.uint8)  # z fastest: slices are read in blocks
    view = as_strided(column, shape=(1024, 1024, 3), strides=(0, 0, 1), writeable=False)
    out = native.slices(view, (1, 1, 1), size=(32, 32), norm="none", threads=2)
    np.testing.assert_array_equal(out[:, 0, 5, 7], [1.0, 2.0, 3.0])
    assert np.all(out == np.arange(1, 4, dtype=np.float32)[:, None, None, None])


# 2. Spacing ratios: one that overflows to infinity, or is merely absurd, is refused.
@pytest.mark.parametrize(("spacing", "target"), [(1e300, 1e-300), (1e200, 1e-100), (1.0, 1e-4)])
def test_spacing_ratio_out_of_range_is_refused(spacing, target):
    values = np.ones((1, 32, 32), np.float32)
    with pytest.raises(ValueError, match=r"outside \[0.001, 1000\]"):
        native.to_original(values, (9, 9, 1), (spacing, spacing, 1.0), target_spacing=(target,) * 2)
    with pytest.raises(ValueError, match=r"outside \[0.001, 1000\]"):
        native.slices(ramp_volume(), (target, target, 1.0), size=(32, 32),
                      target_spacing=(spacing, spacing))


def test_largest_allowed_ratio_gives_finite_values():
    values = np.ones((1, 32, 32), np.float32)
    out = native.to_original(values, (9, 9, 1), (1000.0, 1000.0, 1.0))
    assert np.isfinite(out).all() and 0 < out[4, 4, 0] < 0.01  # 32^2 of 1000^2 model pixels


# 3. to_original: a bounded model grid, and nothing allocated when there is nothing to do.
@pytest.mark.parametrize("side", [100_000, 1_500_000_000])  # numpy: (0, 3e9, 3e9) is too big
def test_to_original_bounds_the_model_grid(side):
    values = np.zeros((0, side, side), np.float32)
    with pytest.raises(ValueError, match="model-grid slices .* must be between 1 and 4096"):
        native.to_original(values, (10, 10, 1), (1, 1, 1), slice_indices=[])


def test_to_original_with_no_slices_returns_zeros():
    out = native.to_original(np.zeros((0, 64, 64), np.float32), (10, 12, 3), (1, 1, 1),
                             slice_indices=[])
    assert out.shape == (10, 12, 3) and not out.any()


# 4. No write races: duplicate indices and aliased outputs are refused; threads agree bit for bit.
def test_to_original_refuses_duplicate_slice_indices():
    values = np.ones((3, 32, 32), np.float32)
    with pytest.raises(ValueError, match="slice index 1 appears more than once"):
        native.to_original(values, (20, 20, 4), (1, 1, 1), slice_indices=[1, 3, 1], threads=2)


def test_to_original_is_bit_identical_for_any_thread_count():
    rng = np.random.default_rng(4)
    values = rng.random((9, 64, 64)).astype(np.float32)
    indices = rng.permutation(12)[:9]
    runs = [native.to_original(values, (50, 45, 12), (0.9, 1.2, 1.0), slice_indices=indices,
                               threads=t) for t in (1, 2, 3, 5)]
    assert all(r.tobytes() == runs[0].tobytes() for r in runs[1:])
    np.testing.assert_allclose(runs[0], reference.to_original(values, (50, 45, 12), (0.9, 1.2, 1.0),
                                                              slice_indices=indices), atol=1e-6)


def test_binding_refuses_an_output_whose_slices_share_memory():
    backing = np.zeros((20, 20), np.float32)
    aliased = as_strided(backing, shape=(20, 20, 4), strides=(4, 80, 0))  # z-stride 0, writeable
    with pytest.raises(ValueError, match="share memory"):
        _native.to_original(np.ones((2, 32, 32), np.float32), (1, 1, 1), (1, 1),
                            np.array([0, 2], np.int64), 2, aliased)
    assert not backing.any()


# 6. out buffers are refused, never converted (a converted copy would take the result).
def bad_slice_outputs(shape):
    big = np.zeros((*shape[:3], shape[3] * 2), np.float32)
    readonly = np.zeros(shape, np.float32)
    readonly.flags.writeable = False
    return {
        "fortran": np.zeros(shape, np.float32, order="F"),
        "non-contiguous": big[..., ::2],
        "float16": np.zeros(shape, np.float16),
        "float64": np.zeros(shape, np.float64),
        "big-endian": np.zeros(shape, ">f4"),
        "read-only": readonly,
        "misaligned": misaligned(np.zeros(shape, np.float32)),
    }


@pytest.mark.parametrize("kind", list(bad_slice_outputs((2, 1, 32, 32))))
def test_slices_refuses_an_out_it_would_have_to_convert(kind):
    volume = ramp_volume()
    out = bad_slice_outputs((5, 1, 32, 32))[kind]
    before = out.copy()
    with pytest.raises(ValueError, match="out must be a C-contiguous, writeable, aligned float32"):
        native.slices(volume, (1, 1, 1), size=(32, 32), out=out)
    np.testing.assert_array_equal(out, before)


def test_mask_slices_refuses_a_bool_out_and_slices_a_list():
    labels = (ramp_volume() > 50).astype(np.uint8)
    with pytest.raises(ValueError, match="out must be .* uint8 .* dtype is bool"):
        native.mask_slices(labels, (1, 1, 1), size=(32, 32), out=np.zeros((5, 1, 32, 32), bool))
    with pytest.raises(TypeError, match="out must be a numpy array"):
        native.slices(ramp_volume(), (1, 1, 1), size=(32, 32), out=[0.0] * 5)  # type: ignore[arg-type]


def test_slices_refuses_an_out_that_overlaps_the_volume():
    volume = np.ascontiguousarray(ramp_volume((32, 32, 1), np.float32))
    with pytest.raises(ValueError, match="shares memory with the volume"):
        native.slices(volume, (1, 1, 1), size=(32, 32), out=volume.reshape(1, 1, 32, 32))


@pytest.mark.parametrize("out", [
    np.zeros((20, 20, 4), np.float64, order="F"),
    np.zeros((20, 20, 4), np.int64, order="F"),
    np.zeros((20, 20, 4), ">f4", order="F"),
    np.ndarray((20, 20, 4), np.float32, buffer=bytearray(20 * 20 * 4 * 6), strides=(6, 120, 2400)),
], ids=["float64", "int64", "big-endian", "strides-not-multiple-of-4"])
def test_to_original_binding_refuses_an_out_it_would_have_to_convert(out):
    before = out.copy()
    with pytest.raises(ValueError, match="out must be a writeable, aligned 3-D float32 volume"):
        _native.to_original(np.ones((1, 32, 32), np.float32), (1, 1, 1), (1, 1),
                            np.array([2], np.int64), 1, out)
    np.testing.assert_array_equal(out, before)


# 6. Misaligned inputs: ubc.preprocess copies them; the binding refuses them.
def test_misaligned_inputs_are_copied_by_the_api_and_refused_by_the_binding():
    volume = ramp_volume()
    want = native.slices(volume, (1, 1, 1), size=(32, 32), slice_indices=[4, 0])
    indices = misaligned(np.array([4, 0], np.int64))
    got = native.slices(misaligned(volume), (1, 1, 1), size=(32, 32), slice_indices=indices)
    np.testing.assert_array_equal(got, want)
    values = misaligned(np.ones((2, 32, 32), np.float32))
    back = native.to_original(values, (20, 20, 5), (1, 1, 1), slice_indices=indices)
    assert back[:, :, [0, 4]].all() and not back[:, :, 1:4].any()
    with pytest.raises(ValueError, match="volume is not aligned"):
        _native.slices(misaligned(volume), (1, 1, 1), (32, 32), (1, 1), "zscore",
                       np.array([0], np.int64), 1, np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="slice indices is not aligned"):
        _native.lesion_areas(volume, (1, 1, 1), indices, 1, np.zeros(2))
