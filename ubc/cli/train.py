"""``ubc-train``: train UBC (or the ResNet34 baseline) on an archive and write a bundle.

    ubc-train --data ARCHIVE --out model.ubc [--arch ubc-resnet34|resnet34] [--epochs 200]
              [--batch-size 50] [--lr 2e-5] [--size 224] [--per-class N] [--alpha 0.5]
              [--seed 0] [--device auto] [--preset paper|sweep|quick]
"""

from __future__ import annotations

import argparse
import json
import sys

from ubc.errors import UBCError
from ubc.model import ARCHITECTURES
from ubc.provenance import synthetic_warning


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ubc-train", description="Train a UBC bundle on a "
                                "BraTS-layout archive or a manifest CSV (case_id,image,mask,"
                                "label); test metrics come from a held-out patient split.")
    p.add_argument("--data", required=True, help="archive folder or manifest .csv")
    p.add_argument("--out", required=True, help="bundle directory to write (NAME.ubc)")
    p.add_argument("--labels", help="grade CSV for BraTS 2020+ layouts (case id, grade)")
    p.add_argument("--preset", default="paper", help="paper | sweep | quick: defaults that "
                   "the other options override (default: paper)")
    p.add_argument("--arch", choices=ARCHITECTURES)
    p.add_argument("--epochs", type=int, help="train for epochs (replaces a preset's --steps)")
    p.add_argument("--steps", type=int, help="a fixed optimiser-step budget (lr x0.9 every "
                   "10 %% of it)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate (x0.9 every --lr-step epochs)")
    p.add_argument("--lr-step", type=int)
    p.add_argument("--size", type=int, help="input size in pixels (square, multiple of 32)")
    p.add_argument("--spacing", type=float, help="in-plane pixel size in mm")
    p.add_argument("--per-class", type=int, help="labelled training slices per class "
                   "(the paper's sweep; default: all top-k slices)")
    p.add_argument("--alpha", type=float, help="weight of CE in a*CE + (1-a)*SoftDice")
    p.add_argument("--deep-supervision", action="store_true", default=None,
                   help="mask loss at every decoder scale (UBC only)")
    p.add_argument("--min-steps", type=int, help="stretch epochs to at least this many steps")
    p.add_argument("--test-fraction", type=float, help="patients held out for test (0.5)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads (0 = all available cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


_FIELDS = {"arch": "arch", "epochs": "epochs", "steps": "steps", "batch_size": "batch_size",
           "lr": "lr", "lr_step": "lr_step", "per_class": "per_class", "alpha": "alpha",
           "deep_supervision": "deep_supervision", "min_steps": "min_steps",
           "test_fraction": "test_fraction", "seed": "seed", "device": "device",
           "threads": "threads"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ubc.training import TrainConfig, train

    overrides = {field: getattr(args, name) for name, field in _FIELDS.items()
                 if getattr(args, name) is not None}
    if args.size is not None:
        overrides["size"] = (args.size, args.size)
    if args.spacing is not None:
        overrides["target_spacing"] = (args.spacing, args.spacing)
    try:
        config = TrainConfig.preset(args.preset, **overrides)
        result = train(args.data, args.out, config, labels=args.labels,
                       progress=not args.quiet)
    except (UBCError, ValueError) as exc:
        print(f"ubc-train: {exc}", file=sys.stderr)
        return 2
    print(f"bundle: {result.bundle.path}")
    record = result.training_data
    print(json.dumps({"train": result.train_summary, "test": result.test,
                      "training_data": record.to_json() if record else None}, indent=2))
    warning = synthetic_warning(record)
    if warning:
        print(f"ubc-train: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
