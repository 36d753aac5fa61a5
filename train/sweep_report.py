"""Gates, tables and figures of train/sweep.py (see its docstring)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ubc.data import SliceSet
from ubc.metrics import roc_auc

# two-sided 95 % Student t quantiles by degrees of freedom (scipy is not a dependency)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
OVERLAP_CAP = 0.9  # ubc.synth.SynthConfig.overlap = 0.1: 10 % of cases look like the other grade
FIELDS = ["stage", "variant", "arch", "per_class", "seed", "lr", "steps", "batch_size",
          "train_slices", "val_auc", "val_patient_accuracy", "test_accuracy",
          "test_patient_accuracy", "test_auc", "test_patient_auc", "test_dice", "seconds"]


def rows(out: Path, stage: str) -> list[dict[str, Any]]:
    """Every finished run of ``stage`` (its JSON rows under ``OUT/runs/``)."""
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"{stage}-*.json"))]


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % t-interval of the mean over seeds."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan, math.nan, math.nan)
    df = len(x) - 1
    t = T975[max(k for k in T975 if k <= df)]
    half = t * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


# ---- gates (NumPy, seconds) ------------------------------------------------------------------

def _depth(masks: np.ndarray) -> np.ndarray:
    """Erosion depth of every mask pixel (4-neighbour steps to the border), [N, H, W]."""
    depth = np.zeros(masks.shape, np.int32)
    current = masks.astype(bool)
    while current.any():
        depth += current
        shrunk = current.copy()
        shrunk[:, 1:, :] &= current[:, :-1, :]
        shrunk[:, :-1, :] &= current[:, 1:, :]
        shrunk[:, :, 1:] &= current[:, :, :-1]
        shrunk[:, :, :-1] &= current[:, :, 1:]
        current = shrunk
    return depth


def mask_feature(data: SliceSet) -> np.ndarray:
    """Per slice: mean intensity of the lesion's outer half minus its inner half (by erosion
    depth), with the ground-truth mask: the HGG core is darker than its border."""
    images, depth = data.images[:, 0], _depth(data.masks[:, 0] > 0)
    deepest = depth.reshape(len(depth), -1).max(1)[:, None, None]
    inner = depth > deepest / 2
    outer = (depth > 0) & ~inner

    def mean(where: np.ndarray) -> np.ndarray:
        return (images * where).sum((1, 2)) / np.maximum(where.sum((1, 2)), 1)

    return mean(outer) - mean(inner)


def slice_statistics(data: SliceSet) -> np.ndarray:
    """[N, 6] whole-slice statistics of the brain pixels: mean, SD, skewness, kurtosis,
    99th percentile and the fraction above 2 (what a global classifier could latch onto)."""
    out = []
    for image in data.images[:, 0]:
        brain = image[image != image[0, 0]]
        z = (brain - brain.mean()) / max(brain.std(), 1e-6)
        out.append([brain.mean(), brain.std(), (z ** 3).mean(), (z ** 4).mean(),
                    np.percentile(brain, 99), (brain > 2).mean()])
    return np.asarray(out, np.float64)


def _per_patient(values: np.ndarray, data: SliceSet) -> tuple[np.ndarray, np.ndarray]:
    """(mean value per patient [P, ...], grade per patient [P])."""
    patients = np.unique(data.patient)
    return (np.stack([values[data.patient == p].mean(0) for p in patients]),
            np.array([data.labels[data.patient == p][0] for p in patients]))


def logistic_fit(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> Callable[[np.ndarray],
                                                                             np.ndarray]:
    """A standardised L2 logistic regression by Newton's method; returns its scorer."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    a = np.c_[np.ones(len(x)), (x - mu) / sd]
    w = np.zeros(a.shape[1])
    for _ in range(25):
        p = 1 / (1 + np.exp(-a @ w))
        grad = a.T @ (p - y) + l2 * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, grad)
    return lambda z: 1 / (1 + np.exp(-np.c_[np.ones(len(z)), (z - mu) / sd] @ w))


def gates(splits: dict[str, tuple[SliceSet, np.ndarray]]) -> dict[str, Any]:
    """The sweep's preconditions, measured on the test split (fitted on the train split)."""
    train, _ = splits["train"]
    test, looks = splits["test"]
    feat_train, y_train = _per_patient(mask_feature(train), train)
    feat_test, y_test = _per_patient(mask_feature(test), test)
    look_test = _per_patient(looks.astype(float), test)[0] > 0.5
    threshold = logistic_fit(feat_train[:, None], y_train)
    one_feature_acc = float(((threshold(feat_test[:, None]) >= 0.5) == y_test).mean())
    stats_train, _ = _per_patient(slice_statistics(train), train)
    stats_test, _ = _per_patient(slice_statistics(test), test)
    stats_auc = roc_auc(y_test, logistic_fit(stats_train, y_train)(stats_test))
    single = [roc_auc(y_test, stats_test[:, k]) for k in range(stats_test.shape[1])]
    return {"mask_feature_auc_vs_appearance": roc_auc(look_test, feat_test),
            "mask_feature_auc_vs_grade": roc_auc(y_test, feat_test),
            "mask_feature_accuracy": one_feature_acc,
            "slice_statistics_auc": stats_auc,
            "slice_statistics_single_auc": [round(v, 3) for v in single],
            "appearance_matches_grade": float((look_test == y_test.astype(bool)).mean()),
            "test_patients": len(y_test)}


def write_gates(out: Path, splits: dict[str, tuple[SliceSet, np.ndarray]]) -> dict[str, Any]:
    """gates.json and gates.md; prints whether each gate passed."""
    g = gates(splits)
    g["mask_gate_passed"] = g["mask_feature_auc_vs_appearance"] >= 0.9
    g["statistics_gate_passed"] = g["slice_statistics_auc"] <= 0.55
    (out / "gates.json").write_text(json.dumps(g, indent=2) + "\n")
    lines = ["# Gates (NumPy, on the test split; fitted on the train split)", "",
             f"{g['test_patients']} test patients; {g['appearance_matches_grade']:.3f} of them "
             "look like their grade (the overlap caps accuracy and AUC at about 0.9).", "",
             "| check | value | gate | passed |", "|---|---|---|---|",
             f"| mask feature (outer - inner lesion contrast) AUC vs appearance | "
             f"{g['mask_feature_auc_vs_appearance']:.3f} | >= 0.9 | {g['mask_gate_passed']} |",
             f"| the same feature, AUC vs grade | {g['mask_feature_auc_vs_grade']:.3f} | "
             "(cap ~0.9) | |",
             f"| one-feature logistic regression, patient accuracy | "
             f"{g['mask_feature_accuracy']:.3f} | | |",
             f"| six whole-slice statistics, logistic regression AUC | "
             f"{g['slice_statistics_auc']:.3f} | <= 0.55 | {g['statistics_gate_passed']} |",
             f"| the same statistics one at a time (mean, SD, skew, kurtosis, p99, >2) | "
             f"{g['slice_statistics_single_auc']} | | |"]
    (out / "gates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return g


# ---- tables --------------------------------------------------------------------------------

def _fmt(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" if not math.isnan(low) else f"{mean:+.3f}"


def _mean_sd(values: Sequence[float | None]) -> str:
    x = [v for v in values if v is not None and not math.isnan(v)]
    if not x:
        return "-"
    return f"{np.mean(x):.3f} ± {np.std(x, ddof=1):.3f}" if len(x) > 1 else f"{x[0]:.3f}"


def paired(runs: list[dict[str, Any]], a: dict[str, Any], b: dict[str, Any], metric: str
           ) -> tuple[float, float, float]:
    """The t-interval over seeds of (run matching ``a``) - (run matching ``b``), paired by
    seed."""
    def by_seed(match: dict[str, Any]) -> dict[int, float]:
        return {r["seed"]: r[metric] for r in runs
                if all(r.get(k) == v for k, v in match.items()) and r[metric] is not None}

    x, y = by_seed(a), by_seed(b)
    return t_interval([x[s] - y[s] for s in sorted(set(x) & set(y))])


def lr_table(lr_rows: list[dict[str, Any]], chosen: dict[str, float]) -> list[str]:
    lines = ["| arch | lr | val AUC (mean ± SD, 3 seeds) | val patient acc | val Dice "
             "| chosen |", "|---|---|---|---|---|---|"]
    for arch in sorted({r["arch"] for r in lr_rows}):
        for lr in sorted({r["lr"] for r in lr_rows}, reverse=True):
            group = [r for r in lr_rows if r["arch"] == arch and r["lr"] == lr]
            dice = [r["curve"][-1]["val_dice"] for r in group]
            note = "yes" if chosen.get(arch) == lr else ("control (the old default)"
                                                        if lr == 2e-5 else "")
            lines.append(f"| {arch} | {lr:g} | {_mean_sd([r['val_auc'] for r in group])} | "
                         f"{_mean_sd([r['val_patient_accuracy'] for r in group])} | "
                         f"{_mean_sd(dice)} | {note} |")
    return lines


def ceiling_table(ceiling: list[dict[str, Any]]) -> list[str]:
    lines = ["## Ceiling: ResNet34 on every training slice (gate: validation AUC >= 0.8)", "",
             "| protocol | lr | val patient AUC | test patient AUC | test patient acc | passed |",
             "|---|---|---|---|---|---|"]
    for variant, lr in sorted({(r["variant"], r["lr"]) for r in ceiling}):
        group = [r for r in ceiling if r["variant"] == variant and r["lr"] == lr]
        val = np.mean([r["val_auc"] for r in group])
        lines.append(f"| {variant} | {lr:g} | {_mean_sd([r['val_auc'] for r in group])} | "
                     f"{_mean_sd([r['test_patient_auc'] for r in group])} | "
                     f"{_mean_sd([r['test_patient_accuracy'] for r in group])} | "
                     f"{bool(val >= 0.8)} |")
    return lines


def sweep_table(runs: list[dict[str, Any]], protocol: str) -> list[str]:
    lines = [f"### Protocol \"{protocol}\"", "",
             "| images/class | ResNet34 patient acc | UBC patient acc | ResNet34 patient AUC "
             "| UBC patient AUC | UBC Dice | UBC - ResNet34 acc [95% t] "
             "| UBC - ResNet34 AUC [95% t] | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    mine = [r for r in runs if r["variant"] == protocol]
    for n in sorted({r["per_class"] for r in mine}):
        at = [r for r in mine if r["per_class"] == n]
        res = [r for r in at if r["arch"] == "resnet34"]
        ubc = [r for r in at if r["arch"] == "ubc-resnet34"]
        acc = paired(at, {"arch": "ubc-resnet34"}, {"arch": "resnet34"},
                     "test_patient_accuracy")
        auc = paired(at, {"arch": "ubc-resnet34"}, {"arch": "resnet34"}, "test_patient_auc")
        lines.append(
            f"| {n} | {_mean_sd([r['test_patient_accuracy'] for r in res])} | "
            f"{_mean_sd([r['test_patient_accuracy'] for r in ubc])} | "
            f"{_mean_sd([r['test_patient_auc'] for r in res])} | "
            f"{_mean_sd([r['test_patient_auc'] for r in ubc])} | "
            f"{_mean_sd([r['test_dice'] for r in ubc])} | {_fmt(*acc)} | {_fmt(*auc)} | "
            f"{len({r['seed'] for r in ubc} & {r['seed'] for r in res})} |")
    return lines


def extension_table(runs: list[dict[str, Any]], sweep_runs: list[dict[str, Any]], n: int
                    ) -> list[str]:
    plain = [r for r in sweep_runs if r["variant"] == "regularised" and r["per_class"] == n]
    both = plain + runs
    lines = [f"At {n} images per class, regularised, paired by seed with the sweep's runs.", "",
             "| variant | patient acc | patient AUC | Dice | - plain UBC, AUC [95% t] "
             "| - ResNet34, AUC [95% t] |", "|---|---|---|---|---|---|"]
    for variant in ("regularised", *sorted({r["variant"] for r in runs})):
        mine = [r for r in both if r["variant"] == variant and r["arch"] == "ubc-resnet34"]
        if not mine:
            continue
        vs_ubc = paired(both, {"variant": variant, "arch": "ubc-resnet34"},
                        {"variant": "regularised", "arch": "ubc-resnet34"}, "test_patient_auc")
        vs_res = paired(both, {"variant": variant, "arch": "ubc-resnet34"},
                        {"variant": "regularised", "arch": "resnet34"}, "test_patient_auc")
        name = "plain UBC" if variant == "regularised" else variant
        lines.append(f"| {name} | {_mean_sd([r['test_patient_accuracy'] for r in mine])} | "
                     f"{_mean_sd([r['test_patient_auc'] for r in mine])} | "
                     f"{_mean_sd([r['test_dice'] for r in mine])} | "
                     f"{'-' if variant == 'regularised' else _fmt(*vs_ubc)} | {_fmt(*vs_res)} |")
    return lines


def write_csv(path: Path, runs: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(runs)


def write_report(out: Path, command: str, setup: Any, chosen: dict[str, float]) -> None:
    """sweep.csv (every run), lr.md, sweep.md and the figures."""
    import sweep_plots

    runs = {stage: rows(out, stage) for stage in ("ceiling", "lr", "sweep", "extensions")}
    write_csv(out / "sweep.csv", [r for stage in runs.values() for r in stage])
    base = setup.base
    recipe = (f"{base.size[0]}x{base.size[1]} px of {base.target_spacing[0]:g} mm, "
              f"{base.steps} Adam steps at batch {base.batch_size}, lr x{base.lr_decay} every "
              f"{max(1, (base.steps or 0) // 10)} steps, validation every {base.eval_every} "
              "steps, the test read once at the final step")
    lr_lines = ["# Learning rate (validation patients, 3 seeds)", "", f"Command: `{command}`",
                "", f"Recipe: {recipe}; {setup.lr_size} images per class, regularised.", "",
                *lr_table(runs["lr"], chosen), "", *ceiling_table(runs["ceiling"])]
    (out / "lr.md").write_text("\n".join(lr_lines) + "\n")
    gates_json = json.loads((out / "gates.json").read_text()) \
        if (out / "gates.json").exists() else {}
    md = ["# Sample-size sweep on the phantom benchmark", "", f"Command: `{command}`", "",
          f"Recipe: {recipe}. Learning rates (chosen on validation AUC): {json.dumps(chosen)}.",
          f"Up to {setup.seeds} seeds per size (the column `seeds`: pairs finished), each a "
          "new subsample and initialisation, the two models paired by seed. Test: "
          f"{setup.cases['test']} patients (a separate archive); metrics are per patient.", ""]
    for protocol in ("regularised", "paper"):
        if any(r["variant"] == protocol for r in runs["sweep"]):
            md += sweep_table(runs["sweep"], protocol) + [""]
    if runs["extensions"]:
        md += ["## Beyond the paper", ""]
        md += extension_table(runs["extensions"], runs["sweep"], setup.extension_size) + [""]
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    sweep_plots.write_figures(out, runs, gates_json)
