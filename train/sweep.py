"""The paper's sample-size sweep on the phantom benchmark: ResNet34 vs UBC-ResNet34.

Steps (all seeded; the test split is never used for a choice):
1. write the phantom archive (BraTS layout) unless it exists;
2. split patients 50/50, stratified (the paper's protocol), top-5 lesion slices per patient;
3. learning rate: the paper prints "2 * 10^5"; train each architecture at 2e-4 and 2e-5 on
   part of the *training* patients and score on the rest (validation), keep the better;
4. for each images-per-class size, train both architectures with their chosen learning rate
   and score on the whole test split (metrics averaged over the last evaluations);
5. write ``sweep.csv``, ``sweep.md``, ``lr_selection.csv``, Figure 6/7 style PNGs.

Reduced configuration (a 2-core CPU, about 45 min):
    python train/sweep.py --config reduced --out train/results
The same at 4x the optimiser steps for one size (the follow-up in train/README.md):
    python train/sweep.py --config longer --out train/results/longer
Full configuration (the paper's: 224x224, 200 epochs, every size; a GPU job):
    python train/sweep.py --config full --out train/results-full --device cuda
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ubc.data import SliceSet, discover, load_cases, split_cases, subsample
from ubc.plots import plot_accuracy_vs_dice, plot_accuracy_vs_size
from ubc.synth import write_archive
from ubc.training import TrainConfig, fit

ARCHS = ("resnet34", "ubc-resnet34")
LRS = (2e-4, 2e-5)
CONFIGS: dict[str, dict[str, Any]] = {
    # 152 phantoms like the paper's 76 + 76 patients; 64x64 at 3 mm keeps the lesion core
    # visible (3-7 px) and one run within a few minutes on one CPU thread.
    "reduced": {"cases": 152, "sizes": [1, 2, 5, 10, 19, 38, 190], "lr_per_class": 28,
                "val_patients": 10, "config": TrainConfig.preset("sweep")},
    # why UBC did or did not win: 4x the optimiser steps at one small size, with the
    # learning rate chosen again on validation patients at that budget
    "longer": {"cases": 152, "sizes": [10], "lr_per_class": 10, "val_patients": 10,
               "config": TrainConfig.preset("sweep", min_steps=240)},
    # seconds: checks that the script runs end to end (used by the slow test)
    "smoke": {"cases": 12, "shape": (64, 64, 24), "sizes": [1, 2], "lr_per_class": 1,
              "val_patients": 1, "config": TrainConfig(
                  epochs=1, batch_size=8, min_steps=1, plateau_evals=1, size=(64, 64),
                  target_spacing=(1.0, 1.0), threads=1)},
    "full": {"cases": 152, "sizes": [1, 2, 5, 10, 19, 38, 76, 190], "lr_per_class": 28,
             "val_patients": 10, "config": TrainConfig(plateau_evals=5, min_steps=480)},
}
FIELDS = ["arch", "per_class", "lr", "epochs", "accuracy", "ci_low", "ci_high",
          "patient_accuracy", "auc", "dice", "train_seconds", "seconds_per_epoch"]


def _by_patients(data: SliceSet, keep: set[str]) -> SliceSet:
    rows = [i for i, p in enumerate(data.patient) if data.case_ids[p] in keep]
    return data.take(rows)


def _run(train_set: SliceSet, held_out: SliceSet, config: TrainConfig) -> dict[str, Any]:
    start = time.perf_counter()
    result = fit(train_set, config, test=held_out, progress=False)
    m = result.test or {}
    return {"arch": config.arch, "lr": config.lr, "epochs": result.epochs,
            "accuracy": m["accuracy"], "ci_low": m["accuracy_ci"][0],
            "ci_high": m["accuracy_ci"][1], "patient_accuracy": m["patient_accuracy"],
            "auc": m["auc"], "dice": m.get("dice"),
            "train_seconds": round(time.perf_counter() - start, 1),
            "seconds_per_epoch": round(result.seconds_per_epoch, 3)}


def _append(path: Path, row: dict[str, Any], fields: list[str]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _done(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("per_class", "epochs"):
            r[k] = int(r[k])
        for k in ("lr", "accuracy", "ci_low", "ci_high", "patient_accuracy", "auc"):
            r[k] = float(r[k])
        r["dice"] = float(r["dice"]) if r.get("dice") not in (None, "") else None
    return rows


def choose_lr(train_set: SliceSet, train_ids: list[str], setup: dict[str, Any],
              base: TrainConfig, out: Path) -> dict[str, float]:
    """Per architecture, the learning rate with the better validation accuracy."""
    rng = np.random.default_rng(base.seed + 7)
    val_ids: set[str] = set()
    for grade in (0, 1):
        ids = sorted({train_set.case_ids[p] for p in train_set.patient[train_set.labels == grade]})
        val_ids |= set(rng.permutation(ids)[:setup["val_patients"]].tolist())
    fit_part = _by_patients(train_set, set(train_ids) - val_ids)
    val = _by_patients(train_set, val_ids)
    fit_part = subsample(fit_part, setup["lr_per_class"], seed=base.seed)
    path = out / "lr_selection.csv"
    done = {(r["arch"], r["lr"]): r for r in _done(path)}
    for arch in ARCHS:
        for lr in LRS:
            if (arch, lr) not in done:
                row = {"per_class": setup["lr_per_class"],
                       **_run(fit_part, val, replace(base, arch=arch, lr=lr))}
                _append(path, row, FIELDS)
                done[(arch, lr)] = row
                print(json.dumps(row), flush=True)
    return {arch: max(LRS, key=lambda lr: (done[(arch, lr)]["accuracy"],
                                           done[(arch, lr)]["auc"])) for arch in ARCHS}


def write_report(rows: list[dict[str, Any]], lrs: dict[str, float], out: Path,
                 command: str, setup: dict[str, Any]) -> None:
    """sweep.md (table + findings placeholders filled from the data) and the figures."""
    title = f"phantoms, {setup['config'].size[0]}x{setup['config'].size[1]}"
    plot_accuracy_vs_size(rows, out / "fig6_accuracy_vs_images_per_class.png", title=title)
    plot_accuracy_vs_dice([r for r in rows if r["arch"] == "ubc-resnet34"],
                          out / "fig7_accuracy_vs_dice.png", title=title)
    lines = ["# Sample-size sweep on the phantom benchmark", "", f"Command: `{command}`", "",
             f"Learning rate chosen on validation patients: {json.dumps(lrs)}", "",
             "| images/class | arch | lr | epochs | slice acc (95% Wilson) | patient acc | AUC "
             "| Dice |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["per_class"], r["arch"])):
        dice = f"{r['dice']:.3f}" if r["dice"] is not None else "-"
        lines.append(f"| {r['per_class']} | {r['arch']} | {r['lr']:g} | {r['epochs']} | "
                     f"{r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['patient_accuracy']:.3f} | {r['auc']:.3f} | {dice} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reduced")
    parser.add_argument("--out", type=Path, default=Path("train/results"))
    parser.add_argument("--archive", type=Path, default=Path("/tmp/ubc-phantoms-sweep"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", type=int, nargs="*", help="override images-per-class list")
    args = parser.parse_args(argv)
    setup = dict(CONFIGS[args.config])
    base: TrainConfig = replace(setup["config"], device=args.device, seed=args.seed)
    sizes = args.sizes or setup["sizes"]
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python train/sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "command.txt").write_text(command + "\n")
    if not (args.archive / "labels.csv").exists():
        write_archive(args.archive, setup["cases"], seed=args.seed, progress=True,
                      shape=setup.get("shape", (240, 240, 155)))
    train_cases, test_cases = split_cases(discover(args.archive), seed=args.seed)
    train_set = load_cases(train_cases, base.preprocessing, top_k=base.top_k)
    test_set = load_cases(test_cases, base.preprocessing, top_k=base.top_k)
    lrs = choose_lr(train_set, [c.case_id for c in train_cases], setup, base, args.out)
    print("learning rates:", lrs, flush=True)
    path = args.out / "sweep.csv"
    rows = _done(path)
    for per_class in sizes:
        for arch in ARCHS:
            if any(r["arch"] == arch and r["per_class"] == per_class for r in rows):
                continue
            subset = subsample(train_set, per_class, seed=args.seed)
            row = {"per_class": per_class,
                   **_run(subset, test_set, replace(base, arch=arch, lr=lrs[arch]))}
            _append(path, row, FIELDS)
            rows = _done(path)
            print(json.dumps(row), flush=True)
            write_report(rows, lrs, args.out, command, setup)
    write_report(rows, lrs, args.out, command, setup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
