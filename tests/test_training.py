"""Losses, metrics, the training loop, the bundle it writes, and the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ubc.bundle import Bundle
from ubc.data import SliceSet
from ubc.errors import BundleError
from ubc.losses import classification_loss, soft_dice, soft_dice_loss, ubc_loss
from ubc.metrics import dice_scores, evaluate_predictions, roc_auc, wilson_interval
from ubc.model import build_model, model_from_bundle
from ubc.plots import curve_axis
from ubc.training import TrainConfig, fit, predict


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # 2 OpenMP threads on the shared 2-core machine run slower


def test_soft_dice_facts() -> None:
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 2:5, 2:6] = 1
    logits = torch.where(mask > 0, 100.0, -100.0)
    assert soft_dice_loss(logits, mask).item() == pytest.approx(0.0, abs=1e-6)  # perfect
    assert soft_dice(mask, mask)[1].item() == 1.0  # empty mask, empty prediction
    disjoint = torch.zeros_like(mask)
    disjoint[0, 0, 6:, 6:] = 1
    # no overlap: 1 - eps / (|p| + |m| + eps) with |p| = 4, |m| = 12, eps = 1
    assert soft_dice(disjoint[:1], mask[:1]).item() == pytest.approx(1 / 17)
    half = torch.full_like(mask, 0.5)
    expected = (2 * 0.5 * 12 + 1) / (0.5 * 64 + 12 + 1)
    assert soft_dice(half[:1], mask[:1]).item() == pytest.approx(expected)


def test_cross_entropy_of_known_logits_and_ignored_rows() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])
    assert classification_loss(logits, torch.tensor([1, -1])).item() == \
        pytest.approx(-math.log(0.75))
    assert classification_loss(logits, torch.tensor([-1, -1])).item() == 0.0


def test_ubc_loss_weights_and_baseline() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])
    masks = torch.ones(1, 1, 4, 4)
    mask_logits = torch.full((1, 1, 4, 4), 100.0)
    parts = ubc_loss(logits, mask_logits, torch.tensor([1]), masks, torch.tensor([True]),
                     alpha=0.25)
    assert parts.total.item() == pytest.approx(0.25 * -math.log(0.75) + 0.75 * parts.dice)
    baseline = ubc_loss(logits, None, torch.tensor([1]), masks, torch.tensor([True]))
    assert baseline.total.item() == pytest.approx(-math.log(0.75)) and baseline.dice == 0.0


def test_mask_only_rows_give_no_classification_gradient() -> None:
    torch.manual_seed(0)
    model = build_model("ubc-resnet34").train()
    x = torch.randn(4, 1, 64, 64)
    masks = (torch.rand(4, 1, 64, 64) > 0.7).float()
    labels = torch.full((4,), -1)  # unknown diagnosis: masks only
    class_logits, mask_logits = model(x)
    class_logits.retain_grad()
    parts = ubc_loss(class_logits, mask_logits, labels, masks, torch.ones(4, dtype=torch.bool))
    parts.total.backward()
    head = model.net.classification_head
    assert all(p.grad is None or not p.grad.any() for p in head.parameters())
    assert not class_logits.grad.any()
    assert model.net.encoder.conv1.weight.grad.abs().sum() > 0  # the decoder trains it
    # mixed batch: the unlabelled rows' class logits get exactly zero gradient
    model.zero_grad()
    class_logits, mask_logits = model(x)
    class_logits.retain_grad()
    ubc_loss(class_logits, mask_logits, torch.tensor([0, 1, -1, -1]), masks,
             torch.ones(4, dtype=torch.bool)).total.backward()
    assert class_logits.grad[:2].abs().sum() > 0 and not class_logits.grad[2:].any()


@pytest.mark.parametrize("arch", ["ubc-resnet34", "resnet34"])
def test_one_step_lowers_the_loss(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch).train()
    x = torch.randn(6, 1, 64, 64)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    masks = (torch.rand(6, 1, 64, 64) > 0.8).float()
    has = torch.ones(6, dtype=torch.bool)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-4)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same dropout mask for both measurements
        return ubc_loss(*model(x), labels, masks, has).total

    before = loss()
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    assert loss().item() < before.item()


def test_metrics_known_values() -> None:
    low, high = wilson_interval(81, 100)
    # p = 0.81, z = 1.96: centre 0.7985, half-width 0.0763
    assert (round(low, 3), round(high, 3)) == (0.722, 0.875)
    assert wilson_interval(0, 10)[0] == 0.0
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5  # a tie counts half
    pred = np.zeros((2, 1, 4, 4), bool)
    pred[0, 0, :2] = True
    target = np.zeros_like(pred)
    target[0, 0, :1] = True
    assert dice_scores(pred, target).tolist() == [2 * 4 / 12, 1.0]
    m = evaluate_predictions(np.array([0.9, 0.4, 0.4, 0.2, 0.6, 0.5]),
                             np.array([1, 1, 1, 0, 0, -1]), np.array([0, 0, 0, 1, 1, 2]))
    assert m.n_slices == 5 and m.accuracy == pytest.approx(2 / 5)
    assert m.confusion == ((1, 1), (2, 1))
    assert m.patient_accuracy == 1.0  # means 0.567 -> HGG, 0.4 -> LGG
    assert m.dice is None


def _tiny_set(n: int = 8, size: int = 64) -> SliceSet:
    rng = np.random.default_rng(0)
    masks = np.zeros((n, 1, size, size), np.uint8)
    labels = np.arange(n) % 2
    images = rng.normal(size=(n, 1, size, size)).astype(np.float32)
    for i in range(n):  # a bright square (HGG: with a dark centre) the model can find
        masks[i, 0, 20:40, 20:40] = 1
        images[i, 0, 20:40, 20:40] += 2.0
        if labels[i]:
            images[i, 0, 27:33, 27:33] -= 2.0
    return SliceSet(images, masks, labels.astype(np.int64), np.ones(n, bool),
                    np.arange(n) // 2, tuple(f"p{i}" for i in range(n // 2)))


def test_fit_is_repeatable_and_schedules_the_lr() -> None:
    config = TrainConfig(epochs=1, batch_size=4, lr_step=1, size=(32, 32), threads=1,
                         min_steps=4, plateau_evals=1)
    data = _tiny_set(size=32)
    a = fit(data, config, test=data, progress=False)
    b = fit(data, config, test=data, progress=False)
    assert a.epochs == 2  # 2 steps per epoch, stretched to min_steps = 4 (lr_step too)
    assert [e.lr for e in a.history] == [2e-5, 2e-5]
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                          strict=True):
        assert torch.equal(p, q), name
    assert a.test is not None and a.test["evaluations"] == 1
    assert [e.test is not None for e in a.history] == [False, True]
    long = fit(data, replace(config, arch="resnet34", epochs=3, min_steps=0), progress=False)
    assert [e.lr for e in long.history] == pytest.approx([2e-5, 1.8e-5, 1.62e-5])


def test_deep_supervision_trains_and_leaves_a_plain_model() -> None:
    from ubc.model import inference_state_dict

    config = TrainConfig(epochs=1, batch_size=4, size=(32, 32), threads=1,
                         deep_supervision=True)
    result = fit(_tiny_set(size=32), config, progress=False)
    assert result.history[0].dice_loss > 0
    build_model("ubc-resnet34").load_state_dict(inference_state_dict(result.model))


def test_a_step_budget_decays_every_tenth_and_reads_the_test_once() -> None:
    config = TrainConfig(steps=10, eval_every=4, batch_size=4, lr=1e-3, size=(32, 32),
                         threads=1)
    result = fit(_tiny_set(size=32), config, val=_tiny_set(size=32), test=_tiny_set(size=32),
                 progress=False)
    assert [e.step for e in result.history] == [4, 8, 10]  # every 4 steps and the last one
    assert [e.test is not None for e in result.history] == [False, False, True]
    assert all(e.val is not None and "patient_auc" in e.val for e in result.history)
    # decay x0.9 every step (10 % of 10); the lr logged is the one the last step used
    assert [e.lr for e in result.history] == pytest.approx([1e-3 * 0.9 ** k for k in (3, 7, 9)])
    assert result.epochs == 5  # 2 batches per pass over 8 slices
    unit, at = curve_axis(result.history)  # the curves PNG: one point per log line
    assert unit == "optimiser step" and [at(e) for e in result.history] == [4, 8, 10]
    assert curve_axis([replace(e, step=0) for e in result.history])[0] == "epoch"
    warm = fit(_tiny_set(size=32), replace(config, warmup=4, lr_decay=0.5), progress=False)
    # a linear ramp over 4 steps (lr/5 .. 4 lr/5), then lr x0.5 every step
    assert [e.lr for e in warm.history] == pytest.approx([8e-4, 1.25e-4, 3.125e-5])


def test_presets_count_steps_unless_epochs_are_asked_for() -> None:
    quick = TrainConfig.preset("quick")
    assert quick.steps == 500 and quick.lr == 1e-3 and quick.augment and quick.warmup == 50
    assert quick.batch_size == 8
    assert TrainConfig.preset("quick", epochs=2).steps is None  # explicit epochs win
    assert TrainConfig.preset("quick", epochs=2, steps=7).steps == 7
    assert TrainConfig.preset("paper").steps is None and TrainConfig.preset("paper").lr == 2e-5


def test_augmentation_moves_image_and_mask_together() -> None:
    from ubc.training import _augment

    data = _tiny_set(size=32)
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks).float()
    out_images, out_masks = _augment(images, masks, torch.Generator().manual_seed(3))
    assert not torch.equal(out_images, images)
    for i in range(len(images)):  # the bright square is where the mask went
        inside = out_images[i][out_masks[i] > 0]
        outside = out_images[i][out_masks[i] == 0]
        assert inside.max() > outside.max() + 0.5
        assert int(out_masks[i].sum()) == int(masks[i].sum())  # flips and shifts keep area
    again = _augment(images, masks, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], out_images)  # seeded


def test_segment_first_and_sub_region_masks() -> None:
    data = _tiny_set(size=32)
    three = replace(data, masks=np.repeat(data.masks, 3, axis=1))
    config = TrainConfig(steps=4, eval_every=2, batch_size=4, lr=1e-3, size=(32, 32),
                         threads=1, segment_first=2, mask_channels=3)
    result = fit(three, config, val=data, progress=False)
    assert result.model.net.segmentation_head[0].out_channels == 3
    assert result.history[-1].val is not None and result.history[-1].val["dice"] is not None
    probs = predict(result.model, data.images)[1]
    assert probs is not None and probs.shape == data.masks.shape  # the union of channels
    with pytest.raises(ValueError, match="mask_channels"):
        TrainConfig(arch="resnet34", mask_channels=3)
    with pytest.raises(ValueError, match="union-mask"):
        from ubc.training import train

        train("unused", "unused", config)


@pytest.fixture(scope="module")
def cli_bundle(phantom_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ubc.cli.train import main

    out = tmp_path_factory.mktemp("trained") / "tiny.ubc"
    assert main(["--data", str(phantom_archive), "--out", str(out), "--preset", "quick",
                 "--epochs", "1", "--spacing", "1", "--threads", "1", "--quiet"]) == 0
    return out


def test_cli_bundle_meta_and_files(cli_bundle: Path) -> None:
    bundle = Bundle(cli_bundle)
    meta = bundle.meta
    assert meta["arch"] == "ubc-resnet34" and meta["class_names"] == ["LGG", "HGG"]
    assert meta["preprocessing"] == {"size": [64, 64], "target_spacing": [1.0, 1.0],
                                     "norm": "zscore"}
    # the quick preset's recipe (train/results/lr.md); --epochs replaced its step budget
    assert meta["lr"] == 1e-3 and meta["epochs"] == 1 and meta["top_k"] == 5
    assert meta["training"]["config"]["steps"] is None
    assert meta["training"]["config"]["augment"] is True
    assert meta["training"]["train"]["patients"] + meta["training"]["test"]["patients"] == 6
    assert 0.0 <= meta["metrics"]["test"]["accuracy"] <= 1.0
    for name in ("weights.pt", "train_log.jsonl", "curves.png"):
        assert bundle.file(name).stat().st_size > 0  # sha256 checked
    log = [json.loads(line) for line in bundle.file("train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1] and log[0]["test"]["n_slices"] == 20


def test_cli_bundle_records_its_training_data(cli_bundle: Path) -> None:
    """Issue 25: the training cases' source, counts and spacing, as ubc-train saw them."""
    meta = Bundle(cli_bundle).meta["training"]
    record = meta["training_data"]
    assert record["source"] == "ubc-synth phantoms" and record["root"] == "archive"
    assert sum(record["cases"].values()) == meta["train"]["patients"]
    assert record["spacing_mm"] == {"inplane": [1.0, 1.0], "thickness": [1.0, 1.0]}


def test_bundle_round_trip_gives_identical_outputs(cli_bundle: Path) -> None:
    from ubc.data import case_slices, discover

    bundle = Bundle(cli_bundle)
    case = discover(Path(bundle.meta["training"]["data"]))[0]
    slices = case_slices(case, bundle.preprocessing).images
    model = model_from_bundle(bundle)
    again = model_from_bundle(Bundle(cli_bundle))
    p1, m1 = predict(model, slices)
    p2, m2 = predict(again, slices)
    assert np.array_equal(p1, p2) and np.array_equal(m1, m2)
    state = torch.load(cli_bundle / "weights.pt", weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_tampered_weights_are_refused(cli_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "tampered.ubc"
    shutil.copytree(cli_bundle, copy)
    raw = bytearray((copy / "weights.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (copy / "weights.pt").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256"):
        model_from_bundle(Bundle(copy))


def test_cli_reports_bad_arguments(phantom_archive: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from ubc.cli.train import main

    assert main(["--data", str(phantom_archive), "--out", str(tmp_path / "x.ubc"),
                 "--size", "100"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "y.ubc")]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_smoke(tmp_path: Path) -> None:
    import csv
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    import sweep

    out = tmp_path / "results"
    assert sweep.main(["--config", "smoke", "--archives", str(tmp_path / "arch"),
                       "--out", str(out), "--workers", "1"]) == 0
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    stages = {r["stage"] for r in rows}
    assert stages == {"ceiling", "lr", "sweep", "extensions"}
    # archs x (3 candidates x 3 seeds + the untrained control's one seed)
    assert len([r for r in rows if r["stage"] == "lr"]) == 2 * (3 * 3 + 1)
    assert len([r for r in rows if r["stage"] == "ceiling"]) == 3 * 3
    sweep_rows = {(r["variant"], r["arch"], r["seed"]) for r in rows if r["stage"] == "sweep"}
    assert len(sweep_rows) == 2 * 2 * 2  # protocols x archs x seeds
    for name in ("sweep.md", "lr.md", "gates.md", "fig6_auc_accuracy_vs_size.png",
                 "difference_vs_size.png", "curves.png", "fig7_accuracy_vs_dice.png"):
        assert (out / name).stat().st_size > 0
    # resumable: a second run trains nothing and rewrites the same table
    before = (out / "sweep.csv").read_text()
    assert sweep.main(["--config", "smoke", "--archives", str(tmp_path / "arch"),
                       "--out", str(out), "--workers", "1"]) == 0
    assert (out / "sweep.csv").read_text() == before
