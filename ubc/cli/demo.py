"""``ubc-demo``: the README's main command. The real job on a built-in default:

1. write a phantom archive (BraTS layout, ``ubc-synth``'s generator);
2. train a small UBC bundle on it with the "quick" preset, or reuse the one an earlier run
   made with the same settings (cached under ``--workdir``);
3. export it to ONNX, so that ``ubc-infer`` picks the fastest CPU runtime;
4. run ``ubc-infer`` on a held-out phantom archive (other seed, unseen cases), with masks
   and overlays; the archive and the rows of an earlier run with the same settings are
   reused (``ubc-infer``'s resume);
5. print the result table, the accuracy (and mask Dice) against the phantoms' truth, and
   where the bundle, its training curves, the results and the pictures are.

About 3 minutes on 2 idle CPU cores from a fresh clone (training dominates and slows with
load); seconds on a second run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DemoConfig:
    """What the demo builds. ``shape``: phantom volume (x, y, z) in 1 mm voxels."""

    workdir: Path = Path("ubc-demo")
    train_cases: int = 240
    # 96, not 32: on 32 cases the accuracy's binomial SD is ~0.06 (one draw of 32 read 0.78
    # while 96 cases of two seeds read 0.86 for the same model); about 30 s more scoring
    test_cases: int = 96
    shape: tuple[int, int, int] = (160, 160, 64)
    steps: int | None = None
    backend: str = "auto"
    retrain: bool = False
    seed: int = 7

    def train_config(self) -> Any:
        from ubc.training import TrainConfig

        overrides: dict[str, Any] = {"test_fraction": 0.1, "seed": self.seed}
        if self.steps is not None:
            overrides["steps"] = self.steps
        return TrainConfig.preset("quick", **overrides)

    @property
    def heldout_seed(self) -> int:
        return self.seed + 1000

    def bundle_key(self) -> str:
        """Hash of everything the trained bundle depends on (the cache key)."""
        config = self.train_config()
        return _key({"train": {k: str(v) for k, v in asdict(config).items()},
                     "cases": self.train_cases, "shape": list(self.shape), "seed": self.seed})

    def heldout_key(self) -> str:
        """Hash of everything the held-out archive depends on (its cache key)."""
        return _key({"cases": self.test_cases, "shape": list(self.shape),
                     "seed": self.heldout_seed})


def _key(recipe: dict[str, Any]) -> str:
    """A short hash of ``recipe`` and the package version: the name of a cached folder."""
    import ubc

    text = json.dumps({**recipe, "ubc": ubc.__version__}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"   ({time.perf_counter() - start:.1f}s)", flush=True)


def _cached_bundle(path: Path) -> bool:
    from ubc.bundle import Bundle
    from ubc.errors import BundleError

    try:
        return Bundle(path).has("model.onnx")
    except BundleError:
        return False


def prepare_bundle(config: DemoConfig) -> Path:
    """The demo's trained and exported bundle: reused when cached, else made (atomically:
    a killed demo never leaves a half-made bundle to be reused)."""
    from ubc.export import export
    from ubc.synth import write_archive
    from ubc.training import train

    path = config.workdir / "bundles" / f"phantom-quick-{config.bundle_key()}.ubc"
    if _cached_bundle(path) and not config.retrain:
        print(f"== reusing the bundle trained by an earlier run: {path}"
              " (--retrain to train again)")
        return path
    start = _step(f"1/4 writing {config.train_cases} training phantoms {config.shape}")
    archive = write_archive(config.workdir / "train", config.train_cases, seed=config.seed,
                            shape=config.shape, progress=True)
    _done(start)
    start = _step("2/4 training a small UBC bundle (preset 'quick')")
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    result = train(archive, partial, config.train_config(), progress=True)
    print(f"   test split of the training archive: {_metrics_line(result.test)}")
    _done(start)
    start = _step("3/4 exporting to ONNX")
    export(result.bundle, ("onnx",))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)
    print(f"   bundle: {path}")
    _done(start)
    return path


def prepare_heldout(config: DemoConfig) -> Path:
    """The held-out phantom archive: reused when an earlier run wrote it with the same
    settings, else written (atomically, as the bundle)."""
    from ubc.synth import write_archive

    path = config.workdir / "heldout" / f"phantoms-{config.heldout_key()}"
    if path.is_dir():
        print(f"   reusing the held-out phantoms of an earlier run: {path}")
        return path
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_archive(partial, config.test_cases, seed=config.heldout_seed, shape=config.shape)
    os.replace(partial, path)
    return path


def _metrics_line(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "n/a"
    keys = ("accuracy", "patient_accuracy", "dice", "auc")
    return ", ".join(f"{k} {metrics[k]:.2f}" for k in keys
                     if isinstance(metrics.get(k), (int, float)))


def run_infer(bundle: Path, archive: Path, out_dir: Path, backend: str) -> int:
    """Score the held-out archive with ``ubc.score_archive`` (what ``ubc-infer`` runs; the
    rows already in ``out_dir`` are kept, as ubc-infer resumes); returns ubc-infer's exit
    code for that run (1 when a case failed)."""
    from ubc.scoring import OutputSpec, score_archive

    outputs = OutputSpec.of(out_dir / "results.csv", masks=out_dir / "masks",
                            overlays=out_dir / "overlays", report=out_dir / "report.html")
    command = ["--model", bundle, "--input", archive, "--out", outputs.results, "--masks",
               outputs.masks, "--overlays", outputs.overlays, "--report", outputs.report,
               "--backend", backend]
    print("   $ ubc-infer " + " ".join(shlex.quote(str(a)) for a in command), flush=True)
    summary = score_archive(bundle, archive, outputs, backend=backend, progress=True)
    print(summary.format())
    return 1 if summary.failed else 0


def _truth(archive: Path) -> dict[str, str]:
    with open(archive / "labels.csv", newline="") as f:
        return {row["case_id"]: row["grade"] for row in csv.DictReader(f)}


def _mask_figures(row: Any, masks: Path) -> tuple[float, float]:
    """(true lesion mL, Dice of the written mask against the phantom's labels)."""
    import nibabel as nib

    from ubc.metrics import dice
    from ubc.scoring import safe_name

    seg_path = Path(row.path).with_name(Path(row.path).name.replace("_flair", "_seg"))
    seg: Any = nib.load(seg_path)
    truth = np.asarray(seg.dataobj) > 0
    true_ml = float(truth.sum() * np.prod(seg.header.get_zooms()[:3]) / 1000.0)
    mask_path = masks / f"{safe_name(row.case_id)}.nii.gz"
    if not mask_path.is_file():
        return true_ml, float("nan")
    mask: Any = nib.load(mask_path)
    return true_ml, dice(truth, np.asarray(mask.dataobj) > 0)


def _other_look(case_id: str, grade: str, seed: int) -> bool:
    """Whether held-out phantom ``case_id`` was drawn with the other grade's appearance
    (``SynthConfig.overlap``): no classifier can get such a case right."""
    from ubc.synth import GRADES, case_looks_hgg

    hgg = GRADES.index(grade)
    return case_looks_hgg(case_id, hgg, seed=seed) != bool(hgg)


def report(archive: Path, out_dir: Path, seed: int | None = None) -> float:
    """Print the result table and the accuracy against the truth (and, given the archive's
    ``seed``, on the phantoms that look like their grade); returns the accuracy."""
    from rich.console import Console
    from rich.table import Table

    from ubc.metrics import wilson_interval
    from ubc.scoring import read_results

    truth, rows = _truth(archive), read_results(out_dir / "results.csv")
    table = Table(title=f"ubc-infer on {len(rows)} held-out phantoms")
    for column in ("case", "truth", "predicted", "P(HGG)", "mL", "true mL", "Dice", "status"):
        table.add_column(column, justify="left" if column in ("case", "status") else "right",
                         no_wrap=column == "case")
    correct, dices, typical = 0, [], []
    for row in sorted(rows, key=lambda r: r.case_id):
        true_ml, dice = _mask_figures(row, out_dir / "masks")
        correct += row.predicted_class == truth.get(row.case_id)
        if seed is not None and row.case_id in truth \
                and not _other_look(row.case_id, truth[row.case_id], seed):
            typical.append(row.predicted_class == truth[row.case_id])
        dices += [] if np.isnan(dice) else [dice]
        table.add_row(row.case_id, truth.get(row.case_id, "?"), row.predicted_class or "-",
                      "-" if row.p_hgg is None else f"{row.p_hgg:.2f}",
                      "-" if row.lesion_volume_ml is None else f"{row.lesion_volume_ml:.1f}",
                      f"{true_ml:.1f}", "-" if np.isnan(dice) else f"{dice:.2f}",
                      row.status if row.error is None else f"error: {row.error}")
    Console(width=max(Console().width, 100)).print(table)
    low, high = wilson_interval(correct, len(rows))
    accuracy = correct / max(len(rows), 1)
    print(f"accuracy vs the phantoms' truth: {correct}/{len(rows)} = {accuracy:.2f} "
          f"(95% Wilson {low:.2f}-{high:.2f}); mean mask Dice "
          f"{np.mean(dices) if dices else float('nan'):.2f}")
    if seed is not None:
        print(f"{len(rows) - len(typical)} held-out phantoms were drawn with the other grade's "
              "appearance (SynthConfig.overlap = 10 %: no classifier gets them right); on the "
              f"{len(typical)} others: {sum(typical)}/{len(typical)} = "
              f"{sum(typical) / max(len(typical), 1):.2f}")
    return accuracy


def _print_where(paths: dict[str, Path]) -> None:
    """The closing list of what the demo made and where it is."""
    width = max(map(len, paths))
    print("\nwhere things are:")
    for what, path in paths.items():
        print(f"  {what:<{width}}  {path}")


def run_demo(config: DemoConfig) -> int:
    """The whole demo; returns ubc-infer's exit code."""
    from ubc.bundle import Bundle
    from ubc.training import CURVES_FILE

    started = time.perf_counter()
    config.workdir.mkdir(parents=True, exist_ok=True)
    bundle = prepare_bundle(config)
    start = _step(f"4/4 scoring {config.test_cases} held-out phantoms with ubc-infer")
    heldout = prepare_heldout(config)
    # the rows of one model on one held-out archive: a second run resumes them
    scored = config.workdir / "scored" / \
        f"{config.heldout_key()}-{Bundle(bundle).weights_sha256[:10]}"
    code = run_infer(bundle, heldout, scored, config.backend)
    _done(start)
    print()
    report(heldout, scored, seed=config.heldout_seed)
    _print_where({"bundle": bundle, "training curves": bundle / CURVES_FILE,
                  "results": scored / "results.csv", "report": scored / "report.html",
                  "overlays": scored / "overlays", "masks": scored / "masks"})
    print(f"\nubc-demo finished in {time.perf_counter() - started:.0f}s "
          f"(work folder: {config.workdir})")
    return code


def build_parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    p = argparse.ArgumentParser(prog="ubc-demo", description=__doc__.split("\n\n")[0],
                                epilog="exit code: that of the ubc-infer run (0 = all scored)")
    p.add_argument("--workdir", default=str(defaults.workdir),
                   help=f"where archives, the cached bundle and results go "
                   f"(default: ./{defaults.workdir})")
    p.add_argument("--train-cases", type=int, default=defaults.train_cases)
    p.add_argument("--test-cases", type=int, default=defaults.test_cases)
    p.add_argument("--shape", type=int, nargs=3, default=defaults.shape, metavar=("X", "Y", "Z"))
    p.add_argument("--steps", type=int, help="override the quick preset's optimiser steps")
    p.add_argument("--backend", default=defaults.backend, help="ubc-infer's --backend")
    p.add_argument("--retrain", action="store_true", help="train again even if cached")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = replace(DemoConfig(), workdir=Path(args.workdir), train_cases=args.train_cases,
                     test_cases=args.test_cases, shape=tuple(args.shape), steps=args.steps,
                     backend=args.backend, retrain=args.retrain)
    return run_demo(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
