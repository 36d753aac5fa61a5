"""Training of UBC and the ResNet34 baseline with the paper's recipe, and evaluation.

Recipe: Adam, batch 50, lr x0.9 every 5 epochs, 200 epochs, random initialisation, no
augmentation, L = a * CE + (1 - a) * SoftDice with a = 0.5 (CE alone for the baseline).
A run can instead have a fixed budget of optimiser steps (``TrainConfig.steps``: decay x0.9
every 10 % of the steps, validation every ``eval_every`` steps, the test read once at the
final step), which is what a comparison across sample sizes needs. ``TrainConfig.preset``
names the configurations used in this repository ("paper", "quick", "sweep"); ``train``
runs the whole job from an archive to a bundle directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ubc.bundle import Bundle, Preprocessing, create_bundle
from ubc.data import GRADES, SliceSet
from ubc.losses import ubc_loss
from ubc.metrics import Metrics, evaluate_predictions
from ubc.model import build_model, inference_state_dict
from ubc.provenance import TrainingData
from ubc.scoring.aggregate import p_hgg_of

__all__ = ["TrainConfig", "EpochLog", "FitResult", "TrainResult", "fit", "predict",
           "evaluate", "train", "resolve_device", "set_threads"]

LOG_FILE = "train_log.jsonl"
CURVES_FILE = "curves.png"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (all of it is written to meta.json).

    ``min_steps``: if ``epochs`` would give fewer optimiser steps (tiny samples), epochs and
    ``lr_step`` are stretched by the same factor, so the schedule keeps its shape.
    ``plateau_evals``: test metrics are averaged over the last this-many epochs (the paper
    reads metrics at the plateau, averaged over 5 evaluations).
    ``lesion_free_per_case``: lesion-free brain slices per training case added as mask-only
    rows (``ubc.data.load_lesion_free``); 0 is the paper's protocol (top-k slices only).
    ``steps``: a fixed optimiser-step budget instead of epochs (see the module docstring).
    ``augment``: random flips, shifts of up to 1/16 of the slice, intensity scale and gamma
    (the "regularised" protocol, with ``weight_decay``). ``segment_first``: steps trained on
    the Dice term alone (a = 0) before the joint loss. ``warmup``: steps over which the
    learning rate rises linearly to ``lr`` before the decay schedule. ``mask_channels``: 1
    (the union mask) or 3 (core, rim, oedema as separate decoder channels; a training
    experiment: bundles hold the union-mask model).
    """

    arch: str = "ubc-resnet34"
    epochs: int = 200
    batch_size: int = 50
    lr: float = 2e-5  # the paper's "2 * 10^5"; untrained at CPU budgets (train/results/lr.md)
    lr_decay: float = 0.9
    lr_step: int = 5
    alpha: float = 0.5
    deep_supervision: bool = False
    min_steps: int = 0
    plateau_evals: int = 5
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    size: tuple[int, int] = (224, 224)
    target_spacing: tuple[float, float] = (1.0, 1.0)
    norm: str = "zscore"
    top_k: int = 5
    per_class: int | None = None
    lesion_free_per_case: int = 0
    test_fraction: float = 0.5
    split_seed: int = 0
    steps: int | None = None
    eval_every: int = 25
    augment: bool = False
    weight_decay: float = 0.0
    segment_first: int = 0
    mask_channels: int = 1
    warmup: int = 0

    def __post_init__(self) -> None:
        from ubc.model import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if any(s < 32 or s % 32 for s in self.size):
            raise ValueError(f"size {self.size} must be multiples of 32 (the U-Net halves the "
                             "slice five times); e.g. --size 224, 128, 96 or 64")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.lr_step < 1:
            raise ValueError("epochs >= 1, batch_size >= 2 (BatchNorm), lr > 0 and "
                             f"lr_step >= 1 are required; got {self}")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")
        if (self.steps is not None and self.steps < 1) or self.eval_every < 1 \
                or self.weight_decay < 0 or self.segment_first < 0 or self.warmup < 0:
            raise ValueError("steps and eval_every >= 1, weight_decay, segment_first and "
                             "warmup >= 0 "
                             f"are required; got {self}")
        if self.mask_channels not in (1, 3) or (self.mask_channels == 3
                                                 and self.arch != "ubc-resnet34"):
            raise ValueError("mask_channels is 1 or 3 (sub-regions, ubc-resnet34 only), got "
                             f"{self.mask_channels} for {self.arch}")

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=self.size, target_spacing=self.target_spacing, norm=self.norm)

    @staticmethod
    def preset(name: str, **overrides: Any) -> TrainConfig:
        """"paper": the paper's recipe at 224x224 (a GPU job). "sweep": the CPU sweep's
        recipe (64x64 at 3 mm: a 192 mm field of view, 150 steps at batch 16). "quick": a
        demo bundle in minutes on a CPU (64x64 at 2 mm: a 128 mm field of view, for
        phantoms of about 160x160 voxels; 500 steps at batch 8, regularised)."""
        presets = {
            "paper": TrainConfig(),
            # train/sweep.py's CPU recipe: a fixed step budget for every sample size
            "sweep": TrainConfig(steps=150, batch_size=16, eval_every=25, size=(64, 64),
                                 target_spacing=(3.0, 3.0), threads=1),
            # the sweep's recipe (train/results: lr 1e-3 and the regularised protocol are
            # what the classifier needs to learn at all) at 500 steps, with a warm-up (the
            # class head starts sooner) and a steeper decay (the last weights settle);
            # lesion-free rows teach the segmenter that healthy slices are not lesion
            # (scoring ranks every slice by predicted lesion area). Batch 8, not 16: a step
            # here is mostly per-weight work (0.26 s at batch 8, 0.32 at 16), and on the demo's
            # held-out phantoms 8 reached 0.84-0.89 accuracy and Dice 0.83 against 0.89 and
            # 0.86 at 16, in 103 s of training instead of 147 (the demo within 3 minutes)
            "quick": TrainConfig(steps=500, batch_size=8, eval_every=50, lr=1e-3,
                                 warmup=50, lr_decay=0.7, size=(64, 64),
                                 target_spacing=(2.0, 2.0), augment=True, weight_decay=1e-4,
                                 lesion_free_per_case=3),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        if "epochs" in overrides:  # asking for epochs replaces a preset's step budget
            overrides.setdefault("steps", None)
        return replace(presets[name], **overrides)


@dataclass(frozen=True)
class EpochLog:
    """One line of the training log, written at each evaluation point (every epoch, or every
    ``eval_every`` steps); losses are means over the batches since the previous line."""

    epoch: int
    lr: float
    loss: float
    ce: float
    dice_loss: float
    train_accuracy: float
    seconds: float
    val: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    step: int = 0


@dataclass(frozen=True)
class FitResult:
    """The trained model, its per-epoch log, plateau-averaged test metrics (if a test set
    was given), the epochs actually run and the mean seconds per epoch."""

    model: torch.nn.Module
    history: list[EpochLog]
    test: dict[str, Any] | None
    epochs: int
    seconds_per_epoch: float


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` produced: the bundle, its test metrics, the train-set summary and the
    record of the training data (``ubc.provenance``)."""

    bundle: Bundle
    test: dict[str, Any] | None
    train_summary: dict[str, int]
    fit: FitResult = field(repr=False)
    training_data: TrainingData | None = None


def resolve_device(device: str) -> torch.device:
    """The torch device of ``ubc.devices.resolve_device(device)`` ("auto": cuda when a GPU
    is usable, else cpu)."""
    from ubc import devices

    return torch.device(devices.resolve_device(device))


def set_threads(threads: int) -> int:
    """Intra-op threads for CPU work: ``threads`` or, when 0, the cores this process may
    use (``sched_getaffinity``, which respects container CPU limits)."""
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches; a last batch of one joins the previous one (BatchNorm needs >= 2)."""
    order = rng.permutation(n)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = np.concatenate([batches[-2], batches.pop()])
    return batches


def _to_tensors(data: SliceSet, rows: np.ndarray, device: torch.device
                ) -> tuple[torch.Tensor, ...]:
    return (torch.from_numpy(data.images[rows]).to(device),
            torch.from_numpy(data.labels[rows]).to(device),
            torch.from_numpy(data.masks[rows]).to(device, torch.float32),
            torch.from_numpy(data.has_mask[rows]).to(device))


def _augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The "regularised" protocol's augmentation, one draw per row shared by image and mask:
    flips along both axes, a shift of up to 1/16 of the slice height along each axis (the
    margin is background), intensity x U(0.9, 1.1) and a gamma of U(0.8, 1.25) on |x|
    (z-scored slices are signed)."""
    rows, height = images.shape[0], images.shape[-2]
    draws = torch.rand(rows, 4, generator=generator)
    shifts = torch.randint(-(height // 16), height // 16 + 1, (rows, 2), generator=generator)
    out_images, out_masks = [], []
    for i in range(rows):
        dims = [d for d, flip in ((-1, draws[i, 0] < 0.5), (-2, draws[i, 1] < 0.5)) if flip]
        image, mask = images[i], masks[i]
        if dims:
            image, mask = image.flip(dims), mask.flip(dims)
        shift = (int(shifts[i, 0]), int(shifts[i, 1]))
        image, mask = image.roll(shift, (-2, -1)), mask.roll(shift, (-2, -1))
        gamma = float(0.8 ** (1 - 2 * draws[i, 3])) ** -1  # log-uniform in [0.8, 1.25]
        scale = 0.9 + 0.2 * float(draws[i, 2])
        out_images.append(scale * image.sign() * image.abs().pow(gamma))
        out_masks.append(mask)
    return torch.stack(out_images), torch.stack(out_masks)


def _step(model: torch.nn.Module, optimiser: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
          config: TrainConfig, alpha: float, generator: torch.Generator | None
          ) -> np.ndarray:
    """One optimiser step; returns [loss, ce, dice loss, correct labelled predictions,
    labelled rows]."""
    images, labels, masks, has_mask = batch
    if generator is not None:
        images, masks = _augment(images, masks, generator)
    if config.deep_supervision:
        class_logits, mask_logits, aux = model.forward_aux(images)  # type: ignore[operator]
    else:
        (class_logits, mask_logits), aux = model(images), None
    parts = ubc_loss(class_logits, mask_logits, labels, masks, has_mask, alpha=alpha,
                     aux_mask_logits=aux)
    optimiser.zero_grad(set_to_none=True)
    parts.total.backward()
    optimiser.step()
    known = labels >= 0
    correct = int((class_logits.detach().argmax(1)[known] == labels[known]).sum())
    return np.array([float(parts.total.detach()), parts.ce, parts.dice, correct,
                     int(known.sum())])


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, *, device: torch.device | None = None,
            batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """(P(HGG) float64 [N], mask probabilities float32 [N, 1, H, W] or None) in eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, masks = [], []
    for i in range(0, len(images), batch_size):
        class_logits, mask_logits = model(torch.from_numpy(images[i:i + batch_size]).to(device))
        probs.append(p_hgg_of(class_logits.float().cpu().numpy(), GRADES.index("HGG")))
        if mask_logits is not None:  # sub-region channels: their union, as the mask
            masks.append(torch.sigmoid(mask_logits.float()).amax(1, keepdim=True).cpu().numpy())
    model.train(was_training)
    return (np.concatenate(probs).astype(np.float64),
            np.concatenate(masks) if masks else None)


def evaluate(model: torch.nn.Module, data: SliceSet, *, batch_size: int = 64) -> Metrics:
    """Slice and patient metrics of ``model`` on ``data`` (see ``ubc.metrics``)."""
    p_hgg, mask_probs = predict(model, data.images, batch_size=batch_size)
    return evaluate_predictions(p_hgg, data.labels, data.patient, mask_probs, data.masks,
                                data.has_mask)


def _schedule(config: TrainConfig, steps_per_epoch: int) -> tuple[int, int, int]:
    """(optimiser steps, lr decay every this many steps, evaluation every this many steps):
    the fixed budget of ``config.steps``, or epochs with the ``min_steps`` stretch applied
    (evaluation once per epoch)."""
    if config.steps is not None:
        return config.steps, max(1, config.steps // 10), config.eval_every
    epochs, lr_step = config.epochs, config.lr_step
    if steps_per_epoch * epochs < config.min_steps:
        factor = math.ceil(config.min_steps / (steps_per_epoch * epochs))
        epochs, lr_step = epochs * factor, lr_step * factor
    return epochs * steps_per_epoch, lr_step * steps_per_epoch, steps_per_epoch


def _scheduler(optimiser: torch.optim.Optimizer, config: TrainConfig, decay_every: int
               ) -> torch.optim.lr_scheduler.LRScheduler:
    """x ``lr_decay`` every ``decay_every`` steps, after a linear ramp over ``warmup``."""
    decay = torch.optim.lr_scheduler.StepLR(optimiser, decay_every, gamma=config.lr_decay)
    if not config.warmup:
        return decay
    ramp = torch.optim.lr_scheduler.LinearLR(optimiser, start_factor=1 / (config.warmup + 1),
                                             total_iters=config.warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimiser, [ramp, decay], [config.warmup])


def _plateau(logs: list[EpochLog]) -> dict[str, Any] | None:
    """Mean of the numeric test metrics over the epochs that were evaluated on test."""
    evaluated = [e.test for e in logs if e.test is not None]
    if not evaluated:
        return None
    out: dict[str, Any] = {"evaluations": len(evaluated)}
    for key, value in evaluated[-1].items():
        if isinstance(value, (int, float)) and value is not None:
            out[key] = float(np.mean([e[key] for e in evaluated]))
        elif key == "accuracy_ci" or key == "confusion":
            out[key + "_last"] = value
    if "accuracy" in out:
        from ubc.metrics import wilson_interval

        n = int(evaluated[-1]["n_slices"])
        out["accuracy_ci"] = list(wilson_interval(round(out["accuracy"] * n), n))
    return out


def _log_line(epoch: int, step: int, lr: float, sums: np.ndarray, n_batches: int,
              seconds: float) -> EpochLog:
    return EpochLog(epoch=epoch, step=step, lr=lr, loss=float(sums[0] / n_batches),
                    ce=float(sums[1] / n_batches), dice_loss=float(sums[2] / n_batches),
                    train_accuracy=float(sums[3] / max(sums[4], 1)), seconds=seconds)


def fit(train_set: SliceSet, config: TrainConfig, *, val: SliceSet | None = None,
        test: SliceSet | None = None, log_path: str | os.PathLike[str] | None = None,
        progress: bool = True) -> FitResult:
    """Train a fresh model on ``train_set``; ``val`` is evaluated at every evaluation point
    (for choices such as the learning rate), ``test`` only at the last ``plateau_evals`` of
    them (one, the final step, with a ``steps`` budget): the reported numbers. Seeded: the
    same config and data give the same weights on a CPU."""
    from tqdm import tqdm

    set_threads(config.threads)
    # Denormal floats are slow on x86 CPUs; flushing them changes no result we measure.
    torch.set_flush_denormal(True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed) if config.augment else None
    model = build_model(config.arch, deep_supervision=config.deep_supervision,
                        mask_channels=config.mask_channels).to(device)
    # fused: one kernel for every parameter (on 2 CPU cores 17 ms a step instead of 60-130)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay, fused=True)
    steps_per_epoch = len(_batches(len(train_set), config.batch_size, rng))
    total, decay_every, eval_every = _schedule(config, steps_per_epoch)
    evals = sorted({*range(eval_every, total + 1, eval_every), total})
    test_from = evals[-(1 if config.steps is not None else config.plateau_evals):][0]
    scheduler = _scheduler(optimiser, config, decay_every)
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in finally
    history: list[EpochLog] = []
    queue: list[np.ndarray] = []
    epoch, n_batches, sums, start = 0, 0, np.zeros(5), time.perf_counter()
    bar = tqdm(range(1, total + 1), desc=config.arch, unit="step", disable=not progress)
    try:
        model.train()
        for step in bar:
            if not queue:
                queue, epoch = _batches(len(train_set), config.batch_size, rng), epoch + 1
            alpha = 0.0 if step <= config.segment_first else config.alpha
            sums += _step(model, optimiser, _to_tensors(train_set, queue.pop(0), device),
                          config, alpha, generator)
            n_batches += 1
            lr = optimiser.param_groups[0]["lr"]
            scheduler.step()
            if step not in evals:
                continue
            entry = _log_line(epoch, step, lr, sums, n_batches, time.perf_counter() - start)
            val_m = evaluate(model, val).to_json() if val is not None else None
            test_m = evaluate(model, test).to_json() \
                if test is not None and step >= test_from else None
            entry = replace(entry, val=val_m, test=test_m)
            history.append(entry)
            if log:
                log.write(json.dumps(asdict(entry)) + "\n")
                log.flush()
            bar.set_postfix(_postfix(entry))
            n_batches, sums, start = 0, np.zeros(5), time.perf_counter()
    finally:
        if log:
            log.close()
    seconds = float(sum(e.seconds for e in history)) / max(epoch, 1)
    return FitResult(model.eval(), history, _plateau(history), epoch, seconds)


def _postfix(entry: EpochLog) -> dict[str, str]:
    out = {"loss": f"{entry.loss:.3f}", "acc": f"{entry.train_accuracy:.2f}"}
    if entry.val:
        out["val_acc"] = f"{entry.val['accuracy']:.2f}"
        if entry.val.get("dice") is not None:
            out["val_dice"] = f"{entry.val['dice']:.2f}"
    return out


def _load_split(data: str | os.PathLike[str], config: TrainConfig,
                labels: str | os.PathLike[str] | None, progress: bool
                ) -> tuple[SliceSet, SliceSet | None, TrainingData]:
    """(train slices, test slices, the record of the training cases)."""
    from ubc.data import discover, load_cases, split_cases, subsample, training_data

    cases = discover(data, labels=labels)
    if config.test_fraction > 0:
        train_cases, test_cases = split_cases(cases, test_fraction=config.test_fraction,
                                              seed=config.split_seed)
    else:
        train_cases, test_cases = list(cases), []
    record = training_data(data, train_cases)  # headers first: a broken file fails fast
    prep = config.preprocessing
    train_set = load_cases(train_cases, prep, top_k=config.top_k,
                           lesion_free=config.lesion_free_per_case, progress=progress)
    test_set = load_cases(test_cases, prep, top_k=config.top_k, progress=progress) \
        if test_cases else None
    if config.per_class is not None:
        train_set = subsample(train_set, config.per_class, seed=config.seed)
    return train_set, test_set, record


def train(data: str | os.PathLike[str], out: str | os.PathLike[str],
          config: TrainConfig | None = None, *, labels: str | os.PathLike[str] | None = None,
          progress: bool = True) -> TrainResult:
    """Archive -> bundle: discover cases, split by patient (stratified, seeded), take the
    top-k lesion slices, optionally subsample ``per_class``, train, evaluate on the test
    split and write the bundle at ``out`` (weights, meta.json, per-epoch log, curves PNG).
    meta.json's ``training.training_data`` records the source, cases per grade and spacing
    range of the training cases (``ubc.provenance``)."""
    config = config or TrainConfig()
    if config.mask_channels != 1:
        raise ValueError("a bundle holds the union-mask model (mask_channels=1); sub-region "
                         "masks are a training experiment of fit() (train/sweep.py)")
    train_set, test_set, record = _load_split(data, config, labels, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_tmp = out / f".{LOG_FILE}.partial"
    result = fit(train_set, config, test=test_set, log_path=log_tmp, progress=progress)
    bundle = create_bundle(
        out, arch=config.arch, state_dict=inference_state_dict(result.model),
        preprocessing=config.preprocessing, class_names=GRADES, top_k=config.top_k,
        training={"config": _config_json(config), "data": str(Path(data).resolve()),
                  "train": train_set.summary(), "training_data": record.to_json(),
                  "test": test_set.summary() if test_set is not None else None,
                  "epochs_run": result.epochs, "seconds_per_epoch": result.seconds_per_epoch,
                  "device": str(resolve_device(config.device)),
                  "torch": torch.__version__},
        metrics={"test": result.test}, lr=config.lr, epochs=result.epochs)
    bundle.write_file(LOG_FILE, lambda tmp: tmp.write_bytes(log_tmp.read_bytes()))
    log_tmp.unlink(missing_ok=True)
    from ubc.plots import plot_curves

    bundle.write_file(CURVES_FILE, lambda tmp: plot_curves(result.history, tmp,
                                                           title=f"{config.arch} on {data}"))
    return TrainResult(bundle, result.test, train_set.summary(), result, record)


def _config_json(config: TrainConfig) -> dict[str, Any]:
    out = asdict(config)
    out["size"], out["target_spacing"] = list(config.size), list(config.target_spacing)
    return out
