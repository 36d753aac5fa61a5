"""The paper's sample-size sweep on the phantom benchmark, with the checks that make it mean
something: ResNet34 vs UBC-ResNet34, seeded, paired, on models shown to learn.

Stages (each resumable: one JSON file per finished run under ``OUT/runs/``):

1. ``data``: three phantom archives (train pool, validation, a large test set; separate
   seeds), preprocessed once through ``ubc.io`` + ``ubc.preprocess`` (the scoring code) and
   cached as ``OUT/cache/*.npz`` (top-5 lesion slices, sub-region masks, appearance);
2. ``gates`` (NumPy, seconds): the ground-truth-mask feature separates the grades, whole-slice
   statistics do not (``gates.md``);
3. ``ceiling``: ResNet34 on every training slice, 3 seeds: can the classifier learn at all?
4. ``lr``: learning rate from {1e-4, 3e-4, 1e-3} by validation AUC over 3 seeds at one mid
   size, with 2e-5 (the old default) as an "untrained" control row;
5. ``sweep``: every size x seed x architecture x protocol ("paper": no augmentation;
   "regularised": flips, shifts, intensity scale/gamma, weight decay), paired across models;
6. ``extensions``: sub-region masks, segment-first, mask-only patients, deep supervision;
7. ``report``: ``sweep.csv`` (one row per run), ``sweep.md``, ``gates.md``, ``lr.md`` and the PNGs.

    python train/sweep.py --config cpu --out train/results      # 2 CPU cores, ~1.5 h
    python train/sweep.py --config gpu --out train/results-gpu --device cuda   # a GPU job

``--stage`` runs one stage (``all`` by default); ``--workers`` parallel runs (one thread each).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sweep_report  # noqa: E402

from ubc.data import SliceSet, discover, load_cases  # noqa: E402
from ubc.synth import SynthConfig, case_looks_hgg, write_archive  # noqa: E402
from ubc.training import TrainConfig  # noqa: E402

ARCHS = ("resnet34", "ubc-resnet34")
LR_CANDIDATES = (1e-4, 3e-4, 1e-3)
LR_CONTROL = 2e-5
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Setup:
    """One sweep configuration. ``cases``: patients per split (half of each grade)."""

    cases: dict[str, int]
    shape: tuple[int, int, int]
    base: TrainConfig
    sizes: tuple[int, ...]
    seeds: int
    lr_size: int
    paper_sizes: tuple[int, ...]
    extension_size: int
    archive_seeds: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 1,
                                                                   "test": 2})


CONFIGS: dict[str, Setup] = {
    # 64x64 pixels of 3 mm (a 192 mm field of view: the whole BraTS-size brain); 150
    # optimiser steps at batch 16 on one thread per run, two runs at a time on 2 cores.
    "cpu": Setup(cases={"train": 76, "val": 100, "test": 200}, shape=(240, 240, 80),
                 base=TrainConfig.preset("sweep"),
                 sizes=(2, 5, 10, 19, 38, 76, 190), seeds=5, lr_size=19,
                 paper_sizes=(19,), extension_size=19),
    # the paper's geometry and a GPU's budget: 224x224 at 1 mm, 2000 steps at batch 50
    "gpu": Setup(cases={"train": 76, "val": 40, "test": 300}, shape=(240, 240, 155),
                 base=TrainConfig(steps=2000, batch_size=50, eval_every=25),
                 sizes=(2, 5, 10, 19, 38, 76, 190), seeds=5, lr_size=19,
                 paper_sizes=(2, 5, 10, 19, 38, 76, 190), extension_size=19),
    # seconds: the script end to end (the slow test)
    "smoke": Setup(cases={"train": 8, "val": 4, "test": 4}, shape=(64, 64, 24),
                   base=TrainConfig(steps=4, batch_size=4, eval_every=2, size=(64, 64),
                                    target_spacing=(1.0, 1.0), threads=1),
                   sizes=(2,), seeds=2, lr_size=2, paper_sizes=(2,), extension_size=2),
}


# ---- data --------------------------------------------------------------------------------

def cache_path(out: Path, split: str) -> Path:
    return out / "cache" / f"{split}.npz"


def _appearance(case_ids: tuple[str, ...], labels: np.ndarray, patient: np.ndarray,
                seed: int, config: SynthConfig) -> np.ndarray:
    """Per slice: 1 where the phantom has the HGG appearance (``ubc.synth.case_looks_hgg``)."""
    looks = [case_looks_hgg(c, int(labels[patient == i][0]), seed=seed, config=config)
             for i, c in enumerate(case_ids)]
    return np.asarray(looks, np.int64)[patient]


def prepare(setup: Setup, archives: Path, out: Path, split: str) -> Path:
    """Write the split's archive (unless present) and cache its preprocessed slices."""
    path = cache_path(out, split)
    if path.exists():
        return path
    seed = setup.archive_seeds[split]
    root = archives / split
    if not (root / "labels.csv").exists():
        write_archive(root, setup.cases[split], seed=seed, shape=setup.shape, progress=True)
    data = load_cases(discover(root), setup.base.preprocessing, top_k=setup.base.top_k,
                      mask_channels=3, progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.npz")
    np.savez(tmp, images=data.images, masks=data.masks, labels=data.labels,
             patient=data.patient, case_ids=np.asarray(data.case_ids),
             looks_hgg=_appearance(data.case_ids, data.labels, data.patient, seed,
                                   SynthConfig()))
    os.replace(tmp, path)
    return path


def load_split(out: Path, split: str, *, subregions: bool = False) -> tuple[SliceSet, np.ndarray]:
    """(the cached split as a SliceSet, appearance per slice); union masks unless
    ``subregions`` (core, rim, oedema channels)."""
    z = np.load(cache_path(out, split))
    masks = z["masks"] if subregions else z["masks"].max(axis=1, keepdims=True)
    data = SliceSet(z["images"], masks, z["labels"], np.ones(len(z["labels"]), bool),
                    z["patient"], tuple(str(c) for c in z["case_ids"]))
    return data, z["looks_hgg"]


# ---- runs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One training run: a stage, a variant name, the images per class, a seed, overrides."""

    stage: str
    variant: str
    arch: str
    per_class: int | None
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        size = "all" if self.per_class is None else str(self.per_class)
        lr = f"-lr{self.overrides['lr']:g}" if "lr" in self.overrides else ""
        return f"{self.stage}-{self.variant}-{self.arch}-n{size}{lr}-s{self.seed}"


def _train_rows(data: SliceSet, job: Job, mask_only: int) -> SliceSet:
    """The job's subsample (new per seed), plus ``mask_only`` unlabelled patients (their
    masks only) taken from the patients the subsample left out."""
    from ubc.data import UNLABELLED, subsample

    chosen = data if job.per_class is None else subsample(data, job.per_class, seed=job.seed)
    if not mask_only:
        return chosen
    used = set(np.unique(chosen.patient).tolist())
    rng = np.random.default_rng(job.seed + 101)
    spare = [p for p in rng.permutation(np.unique(data.patient)) if p not in used][:mask_only]
    extra = data.take(np.flatnonzero(np.isin(data.patient, spare)))
    return SliceSet(*(np.concatenate([a, b]) for a, b in (
        (chosen.images, extra.images), (chosen.masks, extra.masks),
        (chosen.labels, np.full(len(extra), UNLABELLED, np.int64)),
        (chosen.has_mask, extra.has_mask), (chosen.patient, extra.patient))), data.case_ids)


def run_job(job: Job, out: str, base: TrainConfig) -> dict[str, Any]:
    """Train one run and score it on validation (every ``eval_every`` steps) and test (once,
    at the final step); writes ``OUT/runs/<key>.json`` and returns its row."""
    from ubc.training import fit, set_threads

    set_threads(1)
    out_path = Path(out)
    overrides = dict(job.overrides)
    mask_only = int(overrides.pop("mask_only", 0))
    config = replace(base, arch=job.arch, seed=job.seed, **overrides)
    subregions = config.mask_channels == 3
    train_set, _ = load_split(out_path, "train", subregions=subregions)
    val, _ = load_split(out_path, "val")
    test, looks = load_split(out_path, "test")
    rows = _train_rows(train_set, job, mask_only)
    start = time.perf_counter()
    result = fit(rows, config, val=val, test=test, progress=False)
    test_m = result.test or {}
    curve = [{"step": e.step, "ce": e.ce, "dice_loss": e.dice_loss, "loss": e.loss,
              "train_accuracy": e.train_accuracy, "val_auc": (e.val or {}).get("patient_auc"),
              "val_dice": (e.val or {}).get("dice")} for e in result.history]
    row = {"key": job.key, "stage": job.stage, "variant": job.variant, "arch": job.arch,
           "per_class": job.per_class or int((train_set.labels == 0).sum()), "seed": job.seed,
           "lr": config.lr, "steps": config.steps, "batch_size": config.batch_size,
           "train_slices": len(rows),
           "val_auc": (result.history[-1].val or {}).get("patient_auc"),
           "val_patient_accuracy": (result.history[-1].val or {}).get("patient_accuracy"),
           "test_accuracy": test_m.get("accuracy"),
           "test_patient_accuracy": test_m.get("patient_accuracy"),
           "test_auc": test_m.get("auc"), "test_patient_auc": test_m.get("patient_auc"),
           "test_dice": test_m.get("dice"),
           "seconds": round(time.perf_counter() - start, 1), "curve": curve}
    path = out_path / "runs" / f"{job.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".partial").write_text(json.dumps(row))
    os.replace(path.with_suffix(".partial"), path)
    return row


def run_all(jobs: list[Job], out: Path, base: TrainConfig, workers: int) -> list[dict[str, Any]]:
    """Run the jobs not finished yet (``workers`` processes), then return every job's row."""
    todo = [j for j in jobs if not (out / "runs" / f"{j.key}.json").exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs done; running {len(todo)}", flush=True)
    from tqdm import tqdm

    def say(row: dict[str, Any]) -> None:
        print(f"  {row['key']}: val AUC {row['val_auc']}, test acc "
              f"{row['test_patient_accuracy']}, Dice {row['test_dice']} "
              f"({row['seconds']} s)", flush=True)

    if workers == 1:
        for job in tqdm(todo, desc="runs", unit="run"):
            say(run_job(job, str(out), base))
    else:  # spawn: a forked child of a process that has run autograd cannot train
        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_job, j, str(out), base) for j in todo]
            for f in tqdm(futures, desc="runs", unit="run"):
                say(f.result())
    return [json.loads((out / "runs" / f"{j.key}.json").read_text()) for j in jobs]


# ---- stages --------------------------------------------------------------------------------

REGULARISED = {"augment": True, "weight_decay": 1e-4}

CEILINGS = {("paper", 1e-3): False, ("paper", 3e-4): False, ("regularised", 1e-3): True}


def ceiling_jobs(setup: Setup) -> list[Job]:
    """ResNet34 on every training slice, 3 seeds: the paper protocol at two learning rates
    and the regularised one (which of them the classifier needs to learn at all)."""
    return [Job("ceiling", variant, "resnet34", None, s,
                {"lr": lr, **(REGULARISED if extra else {})})
            for (variant, lr), extra in CEILINGS.items() for s in range(3)]


def lr_jobs(setup: Setup) -> list[Job]:
    """The candidates over 3 seeds and the untrained control (one seed), in the
    regularised protocol: the one whose ceiling passed (see ``ceiling_jobs``)."""
    return [Job("lr", "regularised", arch, setup.lr_size, s, {"lr": lr, **REGULARISED})
            for lr in (*LR_CANDIDATES, LR_CONTROL) for arch in ARCHS
            for s in range(3 if lr != LR_CONTROL else 1)]


def chosen_lrs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per architecture, the candidate with the best validation AUC averaged over seeds."""
    out = {}
    for arch in ARCHS:
        means = {lr: np.mean([r["val_auc"] for r in rows if r["arch"] == arch
                              and r["lr"] == lr]) for lr in LR_CANDIDATES}
        out[arch] = float(max(means, key=lambda lr: means[lr]))
    return out


def sweep_jobs(setup: Setup, lrs: dict[str, float], seeds: range) -> list[Job]:
    """The regularised protocol at every size, the paper protocol at ``paper_sizes``."""
    jobs = []
    for s in seeds:
        jobs += [Job("sweep", "regularised", arch, n, s, {"lr": lrs[arch], **REGULARISED})
                 for n in setup.sizes for arch in ARCHS]
        jobs += [Job("sweep", "paper", arch, n, s, {"lr": lrs[arch]})
                 for n in setup.paper_sizes for arch in ARCHS]
    return jobs


def extension_jobs(setup: Setup, lrs: dict[str, float], seeds: range) -> list[Job]:
    """UBC variants beyond the paper, regularised, at one size (compared with plain UBC)."""
    lr, n, steps = lrs["ubc-resnet34"], setup.extension_size, setup.base.steps or 0
    variants = {"subregions": {"mask_channels": 3},
                "segment-first": {"segment_first": steps // 3},
                "mask-only": {"mask_only": 20},
                "deep-supervision": {"deep_supervision": True}}
    return [Job("extensions", name, "ubc-resnet34", n, s, {"lr": lr, **REGULARISED, **extra})
            for s in seeds for name, extra in variants.items()]


def queue(setup: Setup, lrs: dict[str, float], stages: tuple[str, ...]) -> list[Job]:
    """The sweep and extension runs in priority order: 3 seeds of everything first (the
    regularised sweep, then the extensions, then the paper protocol), so that a stopped
    run still has paired seeds of every row; then the remaining seeds."""
    jobs: list[Job] = []
    for seeds in (range(min(3, setup.seeds)), range(min(3, setup.seeds), setup.seeds)):
        sweep = sweep_jobs(setup, lrs, seeds) if "sweep" in stages else []
        jobs += [j for j in sweep if j.variant == "regularised"]
        jobs += extension_jobs(setup, lrs, seeds) if "extensions" in stages else []
        jobs += [j for j in sweep if j.variant != "regularised"]
    return jobs


def reuse_lr_runs(out: Path, jobs: list[Job]) -> None:
    """A sweep run whose configuration the learning-rate stage already ran (same size,
    protocol, lr and seed; training is deterministic on a CPU) is that run, not a rerun."""
    for job in jobs:
        target = out / "runs" / f"{job.key}.json"
        source = out / "runs" / f"{replace(job, stage='lr').key}.json"
        if job.stage == "sweep" and source.exists() and not target.exists():
            row = json.loads(source.read_text())
            row.update(key=job.key, stage=job.stage, reused_from=source.stem)
            target.write_text(json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("train/results"))
    parser.add_argument("--archives", type=Path, default=Path("/tmp/ubc-sweep-archives"))
    parser.add_argument("--stage", default="all", choices=("all", "data", "gates", "ceiling",
                                                           "lr", "sweep", "extensions",
                                                           "report"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    setup = CONFIGS[args.config]
    base = replace(setup.base, device=args.device)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = f"python train/sweep.py --config {args.config} --out {out}"
    stages = ("data", "gates", "ceiling", "lr", "sweep", "extensions", "report") \
        if args.stage == "all" else (args.stage,)
    if "data" in stages:
        for split in SPLITS:
            prepare(setup, args.archives / args.config, out, split)
    if "gates" in stages:
        sweep_report.write_gates(out, {s: load_split(out, s) for s in SPLITS})
    if "ceiling" in stages:
        run_all(ceiling_jobs(setup), out, base, args.workers)
    lr_rows = run_all(lr_jobs(setup), out, base, args.workers) if "lr" in stages else None
    if {"sweep", "extensions", "report"} & set(stages):
        lr_rows = lr_rows or sweep_report.rows(out, "lr")
        lrs = chosen_lrs(lr_rows)
        print("learning rates:", lrs, flush=True)
        if {"sweep", "extensions"} & set(stages):
            jobs = queue(setup, lrs, stages)
            reuse_lr_runs(out, jobs)
            run_all(jobs, out, base, args.workers)
    if "report" in stages:
        sweep_report.write_report(out, command, setup, chosen_lrs(sweep_report.rows(out, "lr")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
