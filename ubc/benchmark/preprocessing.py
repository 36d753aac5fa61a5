"""Preparing one volume, ours next to what a user would otherwise write: the native code
(all cores, one thread), the NumPy reference, a torch re-implementation, and the MONAI
chain (LoadImage, Orientation RAS, Spacing, NormalizeIntensity over non-zero voxels,
ResizeWithPadOrCrop) from the .nii.gz file, when ``monai`` is installed (``ubc[bench]``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ubc.benchmark.results import PrepRow, Unavailable
from ubc.benchmark.timing import time_calls
from ubc.bundle import Preprocessing

PREPROCESS = "preprocess"
LOAD_PREPROCESS = "load + preprocess"
MONAI_HINT = "pip install 'ubc[bench]' (or pip install monai)"


def torch_baseline(volume: np.ndarray, spacing: Sequence[float],
                   size: Sequence[int] = (224, 224),
                   target_spacing: Sequence[float] = (1.0, 1.0)) -> np.ndarray:
    """What a user would write with torch: z-score over non-zero voxels, bilinear resize to
    the target spacing (antialiased, as ``ubc.preprocess`` downsamples), centre crop/pad.
    float32 [S, 1, H, W], like ``ubc.preprocess``."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).permute(2, 0, 1)
    foreground = t != 0
    values = t[foreground]
    t = torch.where(foreground, (t - values.mean()) / values.std(unbiased=False), 0.0)
    new = [round(n * s / ts) for n, s, ts in zip(t.shape[1:], spacing[:2], target_spacing,
                                                 strict=True)]
    t = F.interpolate(t[:, None], size=new, mode="bilinear", align_corners=False,
                      antialias=True)
    pads = []
    for have, want in zip(new[::-1], size[::-1], strict=True):
        before = (want - have) // 2
        pads += [before, want - have - before]
    return F.pad(t, pads).numpy()  # negative pads crop


def monai_transforms(preprocessing: Preprocessing, *, load: bool = True) -> Any:
    """The MONAI ``Compose`` a user would chain for the bundle's preprocessing, from a NIfTI
    path (``load``) or from a loaded [1, X, Y, Z] image. ImportError names the install."""
    try:
        from monai.transforms import (
            Compose,
            LoadImage,
            NormalizeIntensity,
            Orientation,
            ResizeWithPadOrCrop,
            Spacing,
        )
    except ImportError as exc:
        raise ImportError(f"the MONAI peer needs monai ({MONAI_HINT})") from exc
    height, width = preprocessing.size
    sx, sy = preprocessing.target_spacing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's own deprecation notices, not ours
        steps = [LoadImage(image_only=True, ensure_channel_first=True)] if load else []
        return Compose([
            *steps,
            Orientation(axcodes="RAS"),
            Spacing(pixdim=(sx, sy, -1.0), mode="bilinear"),  # -1: keep the slice spacing
            NormalizeIntensity(nonzero=True),
            ResizeWithPadOrCrop(spatial_size=(height, width, -1)),
        ])


def quietly(transforms: Any) -> Callable[[Any], Any]:
    """``transforms`` as a function that silences MONAI's warnings while it runs."""
    def run(item: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return transforms(item)
    return run


def monai_chain(preprocessing: Preprocessing) -> Callable[[str], Any]:
    """``monai_transforms`` from a NIfTI path to a [1, X, Y, Z] MetaTensor, quietly."""
    return quietly(monai_transforms(preprocessing))


def monai_slices(output: Any) -> np.ndarray:
    """The MONAI chain's [1, X, Y, Z] output as our float32 [Z, 1, X, Y]."""
    array = np.asarray(output.detach().cpu().numpy() if hasattr(output, "detach") else output)
    return np.ascontiguousarray(np.moveaxis(array[0], -1, 0)[:, None], dtype=np.float32)


def _ours_loaded(path: Path, preprocessing: Preprocessing) -> Callable[[object], np.ndarray]:
    from ubc import preprocess
    from ubc.io import load_volume

    def run(_: object) -> np.ndarray:
        volume = load_volume(path)
        return preprocess.slices(volume.data, volume.spacing, size=preprocessing.size,
                                 target_spacing=preprocessing.target_spacing,
                                 norm=preprocessing.norm)
    return run


def _contenders(volume: Any, path: Path, p: Preprocessing
                ) -> list[tuple[str, str, int | None, Callable[[object], np.ndarray] | str]]:
    """(group, name, threads, function or the reason it cannot run); ours first per group."""
    from ubc import preprocess, preprocess_reference
    from ubc.benchmark.machine import usable_cores

    cores = usable_cores()
    kwargs: dict[str, Any] = dict(size=p.size, target_spacing=p.target_spacing, norm=p.norm)
    found: list[tuple[str, str, int | None, Callable[[object], np.ndarray] | str]] = [
        (PREPROCESS, "ubc native, all cores", cores,
         lambda _: preprocess.slices(volume.data, volume.spacing, threads=0, **kwargs)),
        (PREPROCESS, "ubc native, 1 thread", 1,
         lambda _: preprocess.slices(volume.data, volume.spacing, threads=1, **kwargs)),
        (PREPROCESS, "NumPy reference", 1,
         lambda _: preprocess_reference.slices(volume.data, volume.spacing, **kwargs)),
    ]
    if p.norm != "zscore":
        found.append((PREPROCESS, "torch re-implementation", None,
                      f"it does z-score only; this bundle uses {p.norm!r}"))
    else:
        import torch

        found.append((PREPROCESS, "torch re-implementation", torch.get_num_threads(),
                      lambda _: torch_baseline(volume.data, volume.spacing, p.size,
                                               p.target_spacing)))
    found.append((LOAD_PREPROCESS, "ubc (load_volume + native)", cores, _ours_loaded(path, p)))
    if p.norm != "zscore":
        found.append((LOAD_PREPROCESS, "MONAI chain", None,
                      f"NormalizeIntensity is a z-score; this bundle uses {p.norm!r}"))
    else:
        try:
            chain = monai_chain(p)
            found.append((LOAD_PREPROCESS, "MONAI chain", None,
                          lambda _: monai_slices(chain(str(path)))))
        except ImportError as exc:
            found.append((LOAD_PREPROCESS, "MONAI chain", None, str(exc)))
    return found


def measure_preprocessing(path: str | os.PathLike[str], p: Preprocessing, *, iters: int,
                          max_seconds: float, progress: Callable[[str], None] | None = None
                          ) -> tuple[list[PrepRow], list[Unavailable]]:
    """Time each contender on the volume at ``path`` (one warm-up call each); ratios are
    against ours in the same group, differences against the NumPy reference's output."""
    from ubc.io import load_volume

    path = Path(path)
    volume = load_volume(path)
    expected = None
    rows: list[PrepRow] = []
    missing: list[Unavailable] = []
    ours: dict[str, float] = {}
    for group, name, threads, fn in _contenders(volume, path, p):
        if isinstance(fn, str):
            missing.append(Unavailable("preprocessing", name, fn))
            continue
        if progress:
            progress(f"preprocessing: {name}")
        output = fn(None)  # the warm-up call, kept to check the output
        if expected is None:
            from ubc import preprocess_reference

            expected = preprocess_reference.slices(volume.data, volume.spacing, size=p.size,
                                                   target_spacing=p.target_spacing,
                                                   norm=p.norm)
        stats = time_calls(fn, [None], warmup=0, iters=iters, max_seconds=max_seconds).stats
        ours.setdefault(group, stats.p50)
        diff = np.abs(output - expected) if output.shape == expected.shape else None
        rows.append(PrepRow(group=group, name=name, latency=stats, slices=len(output),
                            ratio=stats.p50 / ours[group], ours=name.startswith("ubc"),
                            threads=threads,
                            max_abs_diff=None if diff is None else float(diff.max()),
                            mean_abs_diff=None if diff is None else float(diff.mean())))
    return rows, missing


def volume_shape_for(p: Preprocessing) -> tuple[int, int, int]:
    """A BraTS-like volume (1 mm voxels) for the bundle's field of view: 240 x 240 x 155
    for 224 x 224 pixels of 1 mm, scaled alike for other geometries."""
    fov = max(s * t for s, t in zip(p.size, p.target_spacing, strict=True))
    side = int(math.ceil(fov * 240 / 224 / 8) * 8)
    return (side, side, max(16, round(155 * side / 240)))
