"""The sweep's figures (PNG): Figure 6 and 7 analogues, the paired difference, the curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ubc.plots import _pyplot

STYLE = {"resnet34": ("tab:blue", "ResNet34"), "ubc-resnet34": ("tab:red", "UBC-ResNet34")}
LINES = {"paper": "-", "regularised": "--"}


def _save(fig: Any, path: Path, title: str | None = None) -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _series(runs: list[dict[str, Any]], arch: str, variant: str, metric: str
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sizes, mean, SD over seeds) of ``metric``."""
    mine = [r for r in runs if r["arch"] == arch and r["variant"] == variant
            and r[metric] is not None]
    sizes = np.array(sorted({r["per_class"] for r in mine}))
    values = [[r[metric] for r in mine if r["per_class"] == n] for n in sizes]
    return (sizes, np.array([np.mean(v) for v in values]),
            np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]))


def figure6(runs: list[dict[str, Any]], gates: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "test_patient_auc", "patient AUC"),
                             (axes[1], "test_patient_accuracy", "patient accuracy")):
        for arch, (colour, label) in STYLE.items():
            for variant, line in LINES.items():
                n, mean, sd = _series(runs, arch, variant, metric)
                if len(n):
                    ax.plot(n, mean, line, color=colour, marker="o", label=f"{label} ({variant})")
                    ax.fill_between(n, mean - sd, mean + sd, color=colour, alpha=0.12)
        ax.axhline(0.9, color="grey", ls=":", label="overlap cap (10 % look like the other grade)")
        if gates:
            oracle = gates["mask_feature_auc_vs_grade"] if metric.endswith("auc") \
                else gates["mask_feature_accuracy"]
            ax.axhline(oracle, color="green", ls="-.", label="mask-feature oracle")
            if metric.endswith("auc"):
                ax.axhline(gates["slice_statistics_auc"], color="black", ls="--", lw=0.8,
                           label="whole-slice statistics")
        ax.axhline(0.5, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("labelled images per class")
        ax.set_ylabel(name)
        ax.set_ylim(0.3, 1.0)
    axes[1].legend(fontsize=7, loc="lower right")
    _save(fig, path, "Test patients vs training size (mean ± SD over seeds)")


def difference(runs: list[dict[str, Any]], path: Path) -> None:
    from sweep_report import paired

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, name in ((axes[0], "test_patient_auc", "AUC"),
                             (axes[1], "test_patient_accuracy", "accuracy")):
        for k, (variant, line) in enumerate(LINES.items()):
            mine = [r for r in runs if r["variant"] == variant]
            sizes = sorted({r["per_class"] for r in mine})
            stats = [paired([r for r in mine if r["per_class"] == n], {"arch": "ubc-resnet34"},
                            {"arch": "resnet34"}, metric) for n in sizes]
            keep = [i for i, st in enumerate(stats) if not np.isnan(st[0])]
            if not keep:
                continue
            sizes, stats = [sizes[i] for i in keep], [stats[i] for i in keep]
            x = np.array(sizes) * (1.0 + 0.04 * k)
            mean = np.array([s[0] for s in stats])
            err = np.array([[s[0] - s[1], s[2] - s[0]] for s in stats]).T
            ax.errorbar(x, mean, yerr=np.nan_to_num(err), fmt="o" + line, capsize=3,
                        label=variant)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("labelled images per class")
        ax.set_ylabel(f"UBC - ResNet34, patient {name}")
        ax.legend(fontsize=8)
    _save(fig, path, "Paired difference by seed, 95 % t-interval")


def figure7(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ubc = [r for r in runs if r["arch"] == "ubc-resnet34" and r["test_dice"] is not None]
    if ubc:
        points = ax.scatter([r["test_dice"] for r in ubc],
                            [r["test_patient_accuracy"] for r in ubc],
                            c=np.log10([r["per_class"] for r in ubc]), cmap="viridis", s=18)
        fig.colorbar(points, ax=ax, label="log10 images per class")
    ax.set_xlabel("test Dice")
    ax.set_ylabel("test patient accuracy")
    ax.set_title("Every UBC run: accuracy vs Dice")
    _save(fig, path)


def curves(runs: list[dict[str, Any]], size: int, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in runs:
        if r["per_class"] != size or r["variant"] not in LINES:
            continue
        colour, label = STYLE[r["arch"]]
        steps = [c["step"] for c in r["curve"]]
        kw = {"color": colour, "alpha": 0.6, "ls": LINES[r["variant"]],
              "label": f"{label} ({r['variant']})" if r["seed"] == 0 else None}
        axes[0].plot(steps, [c["ce"] for c in r["curve"]], **kw)
        if r["arch"] == "ubc-resnet34":
            axes[1].plot(steps, [c["dice_loss"] for c in r["curve"]], **kw)
        axes[2].plot(steps, [c["val_auc"] for c in r["curve"]], **kw)
    for ax, title in zip(axes, ("training cross-entropy", "training Dice loss (UBC)",
                                "validation patient AUC"), strict=True):
        ax.set_xlabel("step")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    _save(fig, path, f"{size} images per class, every seed (when does memorisation start?)")


def write_figures(out: Path, runs: dict[str, list[dict[str, Any]]], gates: dict[str, Any]
                  ) -> None:
    sweep = runs["sweep"]
    if sweep:
        figure6(sweep, gates, out / "fig6_auc_accuracy_vs_size.png")
        difference(sweep, out / "difference_vs_size.png")
        sizes = sorted({r["per_class"] for r in sweep})
        curves(sweep, sizes[len(sizes) // 2], out / "curves.png")
    figure7(sweep + runs["extensions"], out / "fig7_accuracy_vs_dice.png")
