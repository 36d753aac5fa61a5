"""Bundles to benchmark when no trained one is at hand: the real architecture at the real
input size with random weights, whose batch-norm statistics are re-estimated on phantom
slices so that its activations and logits have a trained model's scale (a few units, not
thousands), which keeps the parity figures meaningful. Speed does not depend on the weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ubc.bundle import Bundle, Preprocessing

CPU_FORMATS = ("torchscript", "onnx")


def calibrated_random_bundle(path: str | os.PathLike[str], *,
                             preprocessing: Preprocessing | None = None,
                             arch: str = "ubc-resnet34", seed: int = 0,
                             formats: Sequence[str] = CPU_FORMATS,
                             slices: np.ndarray | None = None) -> Bundle:
    """Create ``path`` (replacing its weights) with seeded random weights of ``arch`` for
    ``preprocessing`` (default: 224 x 224 at 1 mm), batch-norm
    statistics from 64 phantom slices (or ``slices``), and the artifacts of ``formats``
    exported into it (``ubc.export``). meta.json says how the weights were made."""
    import torch

    from ubc.bundle import create_bundle
    from ubc.check_data import phantom_slices
    from ubc.export import export
    from ubc.model import build_model

    preprocessing = preprocessing or Preprocessing()  # the paper's 224 x 224 at 1 mm
    if slices is None:
        slices = phantom_slices(preprocessing, 64, seed=seed)
    torch.manual_seed(seed)
    model = build_model(arch)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for part in np.array_split(slices, max(1, len(slices) // 16)):
            model(torch.from_numpy(np.ascontiguousarray(part)))
    bundle = create_bundle(path, arch=arch, state_dict=model.eval().state_dict(),
                           preprocessing=preprocessing,
                           weights_note=f"random (seed {seed}), batch-norm statistics from "
                                        f"{len(slices)} phantom slices; for benchmarks only")
    if formats:
        export(bundle, tuple(formats), example=slices[:2])
    return bundle


def is_trained(bundle: Bundle) -> bool:
    """Whether meta.json records a training run (``ubc.training`` writes ``training``)."""
    return bool(bundle.meta.get("training"))


def find_trained(roots: Iterable[str | os.PathLike[str]], size: tuple[int, int]
                 ) -> Bundle | None:
    """The most recently written trained bundle of input ``size`` under ``roots``
    (searched two folders deep), or None."""
    from ubc.errors import BundleError

    found: list[tuple[float, Bundle]] = []
    for root in map(Path, roots):
        for meta in [*root.glob("*.ubc/meta.json"), *root.glob("*/*.ubc/meta.json")]:
            try:
                bundle = Bundle(meta.parent)
            except BundleError:
                continue
            if is_trained(bundle) and bundle.preprocessing.size == size:
                found.append((meta.stat().st_mtime, bundle))
    return max(found, key=lambda item: item[0])[1] if found else None
