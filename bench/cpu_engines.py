"""Speed and parity of every CPU backend on one bundle, at the model's real input size.

    python bench/cpu_engines.py                      # 224 x 224, batches 1 and 8, 2 threads
    python bench/cpu_engines.py --bundle MODEL.ubc   # a trained bundle instead

Without --bundle it builds (once, cached under --work) the real architecture at 224 x 224
with random weights whose batch-norm statistics are re-estimated on the parity slices, so
that logits have a trained model's scale; speed does not depend on the weights. It exports
TorchScript, ONNX and an AOTInductor CPU package (compile time reported), then times eager
PyTorch, TorchScript, ONNX Runtime, OpenVINO and AOTInductor round-robin (every backend is
timed in every round, best round kept, so that load from other jobs on a shared machine
hits all of them alike) and checks each against eager PyTorch fp32 on 64 preprocessed
slices of real volumes (../shared/data/real, else synthetic phantoms). Prints a Markdown
table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ubc.benchmark.machine import load_average, machine_facts, usable_cores
from ubc.engine.registry import VARIANTS

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def parity_slices(preprocessing: Any) -> tuple[np.ndarray, str]:
    from ubc.check_data import phantom_slices, volume_slices

    volumes = sorted(REAL.glob("*t2f.nii.gz")) + sorted(REAL.glob("*fla*.nii.gz"))
    if volumes:
        return volume_slices(volumes, preprocessing, 64), \
            "64 slices of " + ", ".join(v.name for v in volumes)
    return phantom_slices(preprocessing, 64), "64 slices of 8 phantoms"


def make_bundle(path: Path, size: int, slices: np.ndarray) -> Any:
    """The calibrated random bundle (weights only), created once."""
    from ubc.benchmark.bundles import calibrated_random_bundle
    from ubc.bundle import Bundle, Preprocessing

    if (path / "meta.json").is_file():
        return Bundle(path)
    return calibrated_random_bundle(path, preprocessing=Preprocessing(size=(size, size)),
                                    slices=slices, formats=())


def export_missing(bundle: Any, slices: np.ndarray, aoti: bool, max_batch: int
                   ) -> dict[str, float]:
    """Export what the bundle lacks; returns seconds per format."""
    from ubc.engine.aoti_backend import AotiEngine
    from ubc.export import exporter

    seconds: dict[str, float] = {}
    for fmt, name in (("torchscript", "model.ts"), ("onnx", "model.onnx")):
        if not bundle.has(name):
            seconds[fmt] = exporter(fmt)(bundle, example=slices[:2]).seconds
    if aoti and AotiEngine.unavailable(bundle, "cpu", "fp32") is not None:
        print("compiling the AOTInductor package (minutes) ...", flush=True)
        seconds["aoti"] = exporter("aoti")(bundle, device="cpu", max_batch=max_batch,
                                           example=slices[:2]).seconds
    return seconds


def time_round(engine: Any, batch: np.ndarray, seconds: float) -> float:
    """Slices per second over calls for at least ``seconds`` (after one warm-up call)."""
    engine.infer(batch)
    calls, start = 0, time.perf_counter()
    while True:
        engine.infer(batch)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 3:
            return calls * len(batch) / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="a (trained) bundle; exports what it lacks")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache/ubc/bench/cpu-engines")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=usable_cores())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0, help="per backend, batch and round")
    p.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor compile")
    p.add_argument("--only", nargs="+", metavar="NAME", help="time only these variants "
                   "(ubc.engine.registry names, e.g. onnxruntime openvino)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    import torch

    from ubc.bundle import Bundle, Preprocessing
    from ubc.engine import load
    from ubc.parity import compare, reference_outputs

    torch.set_num_threads(args.threads)
    preprocessing = (Bundle(args.bundle).preprocessing if args.bundle
                     else Preprocessing(size=(args.size, args.size)))
    slices, source = parity_slices(preprocessing)
    bundle = Bundle(args.bundle) if args.bundle else \
        make_bundle(args.work / f"random-{args.size}.ubc", args.size, slices)
    export_seconds = export_missing(bundle, slices, not args.no_aoti, max(args.batches + [8]))
    reference = reference_outputs(bundle, slices)

    engines, rows = {}, {}
    for variant in VARIANTS.values():
        label, backend, options = variant.name, variant.backend, dict(variant.options)
        if not variant.runs_on("cpu") or (args.only and label not in args.only):
            continue
        reason = variant.engine_class.unavailable(bundle, "cpu", "fp32", **options)
        if reason is not None:
            print(f"skipping {label}: {reason}")
            continue
        started = time.perf_counter()
        engines[label] = load(bundle, backend=backend, device="cpu", max_batch=max(args.batches),
                              threads=args.threads, **options)
        parity = compare(bundle, backend, slices, reference=reference, threads=args.threads,
                         source=source, **options)
        rows[label] = {"backend": backend, "artifact": engines[label].artifact,
                       "load_seconds": round(time.perf_counter() - started, 2),
                       "parity": parity.to_json(), "slices_per_s": {}}
    rng = np.random.default_rng(0)
    loads = [load_average()[0]]
    for _ in range(args.rounds):
        for batch_size in args.batches:
            batch = np.ascontiguousarray(slices[rng.choice(len(slices), batch_size)])
            for label, engine in engines.items():
                speed = time_round(engine, batch, args.seconds)
                best = rows[label]["slices_per_s"].get(str(batch_size), 0.0)
                rows[label]["slices_per_s"][str(batch_size)] = max(best, speed)
        loads.append(load_average()[0])
    for engine in engines.values():
        engine.close()

    doc = {"machine": {**machine_facts(), "threads": args.threads, "load_average_1min": loads},
           "bundle": str(bundle.path), "size": list(preprocessing.size),
           "parity_source": source, "export_seconds": export_seconds, "rows": rows}
    print(f"\nCPU engines, {preprocessing.size[0]} x {preprocessing.size[1]}, "
          f"{args.threads} threads, best of {args.rounds} rounds of {args.seconds:g} s; "
          f"1-min load average {min(loads):.1f}..{max(loads):.1f}; parity on {source}\n")
    header = ("| backend | " + " | ".join(f"batch {b} slices/s" for b in args.batches)
              + " | max abs dlogit | rel | max dP(HGG) | mask Dice | flips | parity |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, row in rows.items():
        q = row["parity"]
        speeds = " | ".join(f"{row['slices_per_s'][str(b)]:.1f}" for b in args.batches)
        print(f"| {label} | {speeds} | {q['max_abs_class_logits']:.1e} | "
              f"{q['max_rel_class_logits']:.1e} | {q['max_abs_p_hgg']:.1e} | "
              f"{q['mask_dice']:.5f} | {q['class_flip_share']:.0%} | "
              f"{'pass' if q['passed'] else 'FAIL'} |")
    if export_seconds:
        print("\nexport seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                               export_seconds.items()))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
