"""The sweep's statistics and gates (train/sweep_report.py) on data with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import sweep_report  # noqa: E402

from ubc.data import SliceSet  # noqa: E402


def _discs(n: int, seed: int = 0) -> SliceSet:
    """Bright discs on noise; grade 1 (HGG-like) has a dark centre, grade 0 does not."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    r = np.hypot(yy - 16, xx - 16)
    images = rng.normal(0, 0.3, (n, 1, 32, 32)).astype(np.float32)
    masks = np.zeros((n, 1, 32, 32), np.uint8)
    labels = np.arange(n) % 2
    for i in range(n):
        masks[i, 0] = r < 8
        images[i, 0][r < 8] += 2.0
        if labels[i]:
            images[i, 0][r < 4] -= 2.0
    return SliceSet(images, masks, labels.astype(np.int64), np.ones(n, bool), np.arange(n),
                    tuple(f"p{i}" for i in range(n)))


def test_t_interval_matches_the_t_table() -> None:
    mean, low, high = sweep_report.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5)
    assert mean == 3.0 and low == pytest.approx(3 - half) and high == pytest.approx(3 + half)
    assert np.isnan(sweep_report.t_interval([1.0])[1])


def test_the_mask_feature_sees_the_core_and_statistics_do_not_see_the_grade() -> None:
    data = _discs(20)
    feature = sweep_report.mask_feature(data)
    assert (feature[data.labels == 1] > 1.0).all()
    assert (np.abs(feature[data.labels == 0]) < 0.5).all()
    shuffled = _discs(40, seed=1)
    looks = shuffled.labels.copy()
    noise = replace_labels(shuffled, np.random.default_rng(2).permutation(shuffled.labels))
    g = sweep_report.gates({"train": (noise, looks), "test": (noise, looks)})
    assert g["mask_feature_auc_vs_appearance"] == 1.0  # the feature follows the appearance
    assert g["mask_feature_auc_vs_grade"] < 0.8  # ... not the shuffled grade


def replace_labels(data: SliceSet, labels: np.ndarray) -> SliceSet:
    return SliceSet(data.images, data.masks, labels, data.has_mask, data.patient, data.case_ids)


def test_paired_differences_pair_by_seed() -> None:
    runs = [{"arch": a, "seed": s, "auc": v} for a, s, v in
            (("u", 0, 0.9), ("u", 1, 0.8), ("r", 0, 0.7), ("r", 1, 0.7), ("r", 2, 0.1))]
    mean, _low, _high = sweep_report.paired(runs, {"arch": "u"}, {"arch": "r"}, "auc")
    assert mean == pytest.approx(0.15)  # seed 2 has no partner and is left out
