"""Figures: training curves of one run (PNG in the bundle)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # never open a window; works on headless machines
    import matplotlib.pyplot as plt

    return plt


def curve_axis(history: Sequence[Any]) -> tuple[str, Callable[[Any], int]]:
    """(axis label, x of a log line) for training curves: the optimiser step where every
    line records one (a step budget logs several lines an epoch), else the epoch."""
    if history and all(e.step for e in history):
        return "optimiser step", lambda e: int(e.step)
    return "epoch", lambda e: int(e.epoch)


def plot_curves(history: Sequence[Any], path: str | os.PathLike[str], *, title: str = "") -> None:
    """Loss (total, CE, Dice) and accuracy (train, val, test) per log line against
    ``curve_axis``, saved as PNG."""
    plt = _pyplot()
    unit, at = curve_axis(history)
    x = [at(e) for e in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [e.loss for e in history], label="loss")
    ax_loss.plot(x, [e.ce for e in history], label="CE")
    if any(e.dice_loss for e in history):
        ax_loss.plot(x, [e.dice_loss for e in history], label="1 - soft Dice")
    ax_loss.set_xlabel(unit)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(x, [e.train_accuracy for e in history], label="train accuracy")
    for split in ("val", "test"):
        points = [(at(e), getattr(e, split)) for e in history if getattr(e, split)]
        if points:
            ax_acc.plot([p[0] for p in points], [p[1]["accuracy"] for p in points], "o-",
                        label=f"{split} accuracy")
            if points[0][1].get("dice") is not None:
                ax_acc.plot([p[0] for p in points], [p[1]["dice"] for p in points], "s--",
                            label=f"{split} Dice")
    ax_acc.set_xlabel(unit)
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_accuracy_vs_size(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *,
                          title: str = "") -> None:
    """Figure 6 of the paper: test accuracy (95% Wilson interval) vs labelled images per
    class, one line per architecture. ``rows``: dicts with arch, per_class, accuracy,
    ci_low, ci_high."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arch in sorted({r["arch"] for r in rows}):
        own = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["per_class"])
        x = [r["per_class"] for r in own]
        y = [r["accuracy"] for r in own]
        err = [[r["accuracy"] - r["ci_low"] for r in own], [r["ci_high"] - r["accuracy"]
                                                             for r in own]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arch)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test accuracy (95% Wilson CI)")
    ax.set_ylim(0.3, 1.02)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def plot_accuracy_vs_dice(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *,
                          title: str = "") -> None:
    """Figure 7 of the paper: UBC test accuracy vs test Dice across the sweep, points
    labelled by images per class."""
    plt = _pyplot()
    own = [r for r in rows if r.get("dice") not in (None, "")]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([float(r["dice"]) for r in own], [r["accuracy"] for r in own])
    for r in own:
        ax.annotate(str(r["per_class"]), (float(r["dice"]), r["accuracy"]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("test Dice (thresholded mask)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
