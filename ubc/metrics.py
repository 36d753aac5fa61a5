"""Evaluation metrics of the paper and a few more: slice accuracy with a 95% Wilson interval,
per-patient accuracy, Dice of the thresholded mask, confusion matrix, ROC AUC."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Metrics", "wilson_interval", "roc_auc", "dice", "dice_scores", "evaluate_predictions"]


@dataclass(frozen=True)
class Metrics:
    """Test metrics. ``accuracy_ci``: 95% Wilson interval (low, high). ``dice``: mean Dice
    over slices with a mask (None for the baseline). ``confusion``: rows true, cols predicted
    (LGG, HGG). ``patient_auc``: AUC of each patient's mean P(HGG) (the patients, not
    their near-duplicate slices, are the independent samples)."""

    n_slices: int
    accuracy: float
    accuracy_ci: tuple[float, float]
    patient_accuracy: float
    n_patients: int
    auc: float
    dice: float | None
    confusion: tuple[tuple[int, int], tuple[int, int]]
    patient_auc: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["accuracy_ci"] = list(self.accuracy_ci)
        out["confusion"] = [list(r) for r in self.confusion]
        return out


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (the paper's accuracy CI)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); nan with one class."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks over all their pixels (1.0 when both are empty)."""
    inter = float(np.logical_and(a, b).sum())
    total = float(np.count_nonzero(a)) + float(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * inter / total


def dice_scores(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dice per slice [N] of binary masks [N, 1, H, W]; 1 where both are empty."""
    pred, target = pred.astype(bool), target.astype(bool)
    inter = (pred & target).sum(axis=(1, 2, 3))
    total = pred.sum(axis=(1, 2, 3)) + target.sum(axis=(1, 2, 3))
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def evaluate_predictions(p_hgg: np.ndarray, labels: np.ndarray, patient: np.ndarray,
                         mask_probs: np.ndarray | None = None, masks: np.ndarray | None = None,
                         has_mask: np.ndarray | None = None) -> Metrics:
    """Metrics of slice predictions ``p_hgg`` [N] against ``labels`` [N] (0/1; rows with -1
    are ignored); per-patient accuracy averages P(HGG) over each patient's slices."""
    keep = labels >= 0
    p, y, pat = p_hgg[keep], labels[keep], patient[keep]
    pred = (p >= 0.5).astype(np.int64)
    correct = int((pred == y).sum())
    confusion = tuple(tuple(int(((y == t) & (pred == q)).sum()) for q in (0, 1)) for t in (0, 1))
    patients = np.unique(pat)
    patient_p = np.array([np.mean(p[pat == q]) for q in patients])
    patient_y = np.array([y[pat == q][0] for q in patients])
    patient_ok = (patient_p >= 0.5) == patient_y.astype(bool)
    dice = None
    if mask_probs is not None and masks is not None:
        rows = has_mask if has_mask is not None else np.ones(len(masks), bool)
        if rows.any():
            dice = float(dice_scores(mask_probs[rows] >= 0.5, masks[rows]).mean())
    return Metrics(n_slices=len(y), accuracy=correct / max(len(y), 1),
                   accuracy_ci=wilson_interval(correct, len(y)),
                   patient_accuracy=float(np.mean(patient_ok)) if patients.size else float("nan"),
                   n_patients=int(patients.size), auc=roc_auc(y, p), dice=dice,
                   confusion=confusion,  # type: ignore[arg-type]
                   patient_auc=roc_auc(patient_y, patient_p) if patients.size else float("nan"))
