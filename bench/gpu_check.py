"""The one prepared check for a lent GPU machine: build, export, parity, throughput.

It builds the native extension, makes a bundle (a trained one with --bundle, else the real
architecture at 224 x 224 with random weights whose batch-norm statistics come from the
parity slices), exports TorchScript and ONNX, then for every GPU variant it can run
(torch CUDA fp32 / fp16 autocast / fp16 half weights / bf16 / CUDA graphs, TorchScript
fp32 and fp16, the AOTInductor package compiled for this GPU, TensorRT fp32/fp16/int8 where
``import tensorrt`` works) measures parity against eager PyTorch fp32 on the CPU over 64
phantom slices read through ubc.io + ubc.preprocess, and throughput in slices/s at batches
1, 8, 32 and 128 (--batches; TensorRT profiles are tuned for 32 or the largest smaller
one). Writes gpu_check.json and gpu_check.md under --out ($OUT) after every section and row
(a run cut off by its time limit keeps what it measured) and prints the table. Every
section is guarded: one failing export, variant or self-test is reported, not fatal. The
ONNX is exported only when TensorRT imports (nothing else on the GPU runs it).

The GPU image has torch (with CUDA), cuda-bindings, onnxruntime, pybind11, scikit-build-core,
cmake, ninja, timm, huggingface-hub, safetensors and httpx (segmentation-models-pytorch's
import-time dependencies), but not segmentation-models-pytorch, nibabel nor isal, nor
tensorrt (its PyPI libs cannot be fetched on any machine we have). Once, here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux2014_x86_64 -d .whl \\
        segmentation-models-pytorch==0.6.0 nibabel==5.4.2 isal

then one device call (carry [".whl"], timeout about 540 s):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT 2>&1 | tee $OUT/log.txt

(--wheels DIR does the first line itself.) --quick times batches 1 and 32 only and skips
the AOTInductor compile, for a second try inside the device-time budget.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 8, 32, 128)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def install_wheels(folder: Path) -> None:
    """pip install the carried wheels into /tmp/site and put it on sys.path."""
    wheels = sorted(str(w) for w in folder.glob("*.whl"))
    if not wheels:
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", "/tmp/site", *wheels], check=True)
    sys.path.insert(0, "/tmp/site")


def build_native() -> str:
    """Build ubc (with ubc._native) into /tmp/ubc-build and import it from there."""
    target = Path("/tmp/ubc-build")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index",
                             "--no-deps", "--no-build-isolation", "--target", str(target),
                             str(ROOT)], capture_output=True, text=True)
    if result.returncode != 0:
        return f"native build failed: {result.stderr[-2000:]}"
    sys.path.insert(0, str(target))
    return f"built in {time.perf_counter() - started:.0f} s"


def phantom_slices_fallback(size: int) -> np.ndarray:
    """64 phantom slices through the NumPy reference, when the native build failed."""
    from ubc import preprocess_reference as ref
    from ubc.synth import phantom

    out = []
    for seed in range(8):
        flair, seg, _ = phantom(seed, grade=seed % 2)
        areas = (seg > 0).sum(axis=(0, 1))
        picks = list(np.argsort(-areas)[:8])
        out.append(ref.slices(flair.astype(np.float32), (1.0, 1.0, 1.0), size=(size, size),
                              slice_indices=picks))
    return np.ascontiguousarray(np.concatenate(out)[:64], dtype=np.float32)


def make_bundle(path: Path, slices: np.ndarray) -> Any:
    from ubc.benchmark.bundles import calibrated_random_bundle
    from ubc.bundle import Preprocessing

    size = slices.shape[-2:]
    return calibrated_random_bundle(
        path, preprocessing=Preprocessing(size=(int(size[0]), int(size[1]))), slices=slices,
        formats=())


def variants(include_aoti: bool, has_trt: bool) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, backend, precision, engine options) to run on the GPU."""
    rows: list[tuple[str, str, str, dict[str, Any]]] = [
        ("torch eager fp32", "torch", "fp32", {"artifact": "eager"}),
        ("torch eager fp16 autocast", "torch", "fp16", {"artifact": "eager"}),
        ("torch eager fp16 half weights", "torch", "fp16",
         {"artifact": "eager", "half_weights": True}),
        ("torch eager bf16 autocast", "torch", "bf16", {"artifact": "eager"}),
        ("torch eager fp16 half + CUDA graphs", "torch", "fp16",
         {"artifact": "eager", "half_weights": True, "cuda_graphs": True}),
        ("TorchScript fp32", "torch", "fp32", {"artifact": "torchscript"}),
        # not through optimize_for_inference: its fused cuDNN ops escape autocast
        ("TorchScript fp16 autocast (frozen graph)", "torch", "fp16",
         {"artifact": "torchscript"}),
        ("TorchScript fp32 + CUDA graphs", "torch", "fp32",
         {"artifact": "torchscript", "cuda_graphs": True}),
    ]
    if include_aoti:
        rows.append(("AOTInductor fp32", "aoti", "fp32", {}))
    if has_trt:
        rows += [(f"TensorRT {p}", "tensorrt", p, {}) for p in ("fp32", "fp16", "int8")]
    return rows


def guarded(results: dict[str, Any], key: str, work: Callable[[], Any]) -> Any:
    try:
        return work()
    except Exception as exc:  # reported in the results; the other sections go on
        results.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
        log(f"{key} failed: {exc}\n{traceback.format_exc(limit=3)}")
        return None


def opt_batch_for(batches: list[int]) -> int:
    """The batch TensorRT profiles are tuned for: 32 (the scoring batch), or the largest
    timed batch when all are smaller (a profile's opt must lie within 1..max)."""
    return min(32, max(batches))


class Recorder:
    """The results so far, written to gpu_check.json and gpu_check.md under ``out`` after
    every section and row: a run killed by its time limit keeps what it measured."""

    def __init__(self, out: Path, batches: list[int]) -> None:
        self.out, self.batches = out, batches
        self.results: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.results, indent=2, default=str)),
                           ("gpu_check.md", markdown(self.results, self.batches) + "\n")):
            tmp = self.out / f".{name}.partial"
            tmp.write_text(text)
            tmp.replace(self.out / name)

    def guarded(self, key: str, work: Callable[[], Any]) -> Any:
        """``work()`` with its exception recorded under ``errors[key]``; saved either way."""
        value = guarded(self.results, key, work)
        self.save()
        return value


def _machine(rec: Recorder, device: str) -> bool:
    """Record the GPU (or the CPU stand-in of a smoke test); False when there is none."""
    import torch

    from ubc.artifacts import GpuInfo
    from ubc.devices import cuda_device_count, gpu_info

    if device != "cpu" and cuda_device_count() == 0:
        rec.results.setdefault("errors", {})["gpu"] = "no usable CUDA GPU on this machine"
        log("no usable CUDA GPU: nothing to check")
        return False
    gpu = gpu_info(0) if device != "cpu" else GpuInfo("CPU (smoke test)", 0, 0)
    rec.results["machine"] = {"gpu": gpu.name, "sm": gpu.sm, "torch": torch.__version__,
                              "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    log(f"GPU {gpu.name} ({gpu.sm}), torch {torch.__version__}")
    return True


def _slices(rec: Recorder, size: int) -> np.ndarray:
    from ubc.bundle import Preprocessing
    from ubc.check_data import phantom_slices

    try:
        slices = phantom_slices(Preprocessing(size=(size, size)), 64)
        rec.results["slices"] = "64 phantom slices via ubc.io + ubc.preprocess"
    except Exception as exc:  # native build or nibabel missing: NumPy reference instead
        log(f"phantom slices through ubc.io failed ({exc}); using the NumPy reference")
        slices = phantom_slices_fallback(size)
        rec.results["slices"] = "64 phantom slices via ubc.preprocess_reference (fallback)"
    return slices


def _exports(rec: Recorder, args: argparse.Namespace, bundle: Any, slices: np.ndarray,
             has_trt: bool) -> None:
    """TorchScript; AOTInductor unless --quick; ONNX and the TensorRT plans with TensorRT
    (nothing else on the GPU runs the ONNX). Each one guarded."""
    from ubc.export import exporter

    exports: dict[str, float] = {}

    def timed(key: str, work: Callable[[], Any]) -> None:
        started = time.perf_counter()
        if rec.guarded(f"{key} export", work) is not None:
            exports[key] = round(time.perf_counter() - started, 1)
        rec.results["export_seconds"] = exports

    timed("torchscript", lambda: exporter("torchscript")(bundle, example=slices[:2]))
    if not args.quick:
        timed("aoti", lambda: exporter("aoti")(bundle, device=args.device,
                                               max_batch=max(args.batches),
                                               example=slices[:2]))
    if not has_trt:
        return
    from ubc.export.tensorrt import TensorRTOptions

    timed("onnx", lambda: exporter("onnx")(bundle, example=slices[:2]))
    for precision in ("fp32", "fp16", "int8"):
        options = TensorRTOptions(precision=precision, max_batch=max(args.batches),
                                  opt_batch=opt_batch_for(args.batches))
        calib = slices if precision == "int8" else None
        timed(f"tensorrt {precision}", functools.partial(
            exporter("tensorrt"), bundle, options=options, calib=calib))
    log(f"exports: {exports}")


def _row(bundle: Any, args: argparse.Namespace, slices: np.ndarray, source: str,
         reference: Any, variant: tuple[str, str, str, dict[str, Any]]) -> dict[str, Any]:
    """Parity and throughput of one variant."""
    import torch

    from ubc.engine import load
    from ubc.parity import compare
    from ubc.parity_timing import time_engine

    label, backend, precision, options = variant
    parity = compare(bundle, backend, slices, device=args.device, precision=precision,
                     reference=reference, source=source, **options)
    row: dict[str, Any] = {"variant": label, "backend": backend, "precision": precision,
                           "parity": parity.to_json(), "slices_per_s": {}}
    with load(bundle, backend=backend, device=args.device, precision=precision,
              max_batch=max(args.batches), **options) as engine:
        row["artifact"] = engine.artifact
        for batch in args.batches:
            row["slices_per_s"][str(batch)] = round(
                time_engine(engine, slices, batch, args.seconds), 1)
    if args.device != "cpu":
        torch.cuda.empty_cache()
    log(f"{label}: {row['slices_per_s']} parity "
        f"{'pass' if parity.passed else 'FAIL ' + '; '.join(parity.failures)}")
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every section of the check, each guarded, the results saved after each one."""
    rec = Recorder(args.out, args.batches)
    results = rec.results
    if args.wheels:
        rec.guarded("wheels", lambda: install_wheels(args.wheels))
    results["native"] = build_native() if not args.no_build else "not built (--no-build)"
    log(results["native"])
    sys.path.insert(1, str(ROOT))
    if not rec.guarded("machine", lambda: _machine(rec, args.device)):
        rec.save()
        return results
    if args.device != "cpu":
        from ubc import cuda_memory

        def round_trip() -> bool:
            data = np.arange(1 << 20, dtype=np.float32)
            return bool((cuda_memory.round_trip(data) == data).all())

        results["cuda_memory_round_trip"] = rec.guarded("cuda memory round trip", round_trip)
    slices = _slices(rec, args.size)
    args.work.mkdir(parents=True, exist_ok=True)
    from ubc.bundle import Bundle

    bundle = Bundle(args.bundle) if args.bundle else make_bundle(args.work / "gpu.ubc", slices)
    has_trt = args.device != "cpu" and rec.guarded(
        "tensorrt import", lambda: __import__("tensorrt")) is not None
    _exports(rec, args, bundle, slices, has_trt)
    from ubc.parity import reference_outputs

    reference = reference_outputs(bundle, slices)
    chosen = variants(not args.quick and "aoti" in results.get("export_seconds", {}), has_trt)
    if args.device == "cpu":
        chosen = [v for v in chosen if v[2] == "fp32" and not v[3].get("cuda_graphs")]
    for variant in chosen:
        row = rec.guarded(variant[0], functools.partial(
            _row, bundle, args, slices, results["slices"], reference, variant))
        if row is not None:
            results["rows"].append(row)
            rec.save()
    return results


def markdown(results: dict[str, Any], batches: list[int]) -> str:
    machine = results.get("machine", {})
    lines = [f"GPU check on {machine.get('gpu', '?')} ({machine.get('sm', '?')}), torch "
             f"{machine.get('torch', '?')}; parity on {results.get('slices', '?')}", "",
             "| variant | " + " | ".join(f"b{b} slices/s" for b in batches)
             + " | rel dlogit | max dP(HGG) | Dice | flips | parity |",
             "|" + "---|" * (len(batches) + 6)]
    for row in results.get("rows", []):
        q = row["parity"]
        speeds = " | ".join(str(row["slices_per_s"].get(str(b), "-")) for b in batches)
        lines.append(f"| {row['variant']} | {speeds} | {q['max_rel_class_logits']:.1e} | "
                     f"{q['max_abs_p_hgg']:.1e} | {q['mask_dice']:.5f} | "
                     f"{q['class_flip_share']:.0%} | {'pass' if q['passed'] else 'FAIL'} |")
    for key, error in results.get("errors", {}).items():
        lines.append(f"- {key}: {error}")
    lines.append(f"- export seconds: {results.get('export_seconds')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    p.add_argument("--work", type=Path, default=Path("/tmp/ubc-gpu-check"))
    p.add_argument("--bundle", type=Path, help="a trained bundle (else calibrated random)")
    p.add_argument("--wheels", type=Path, help="folder of wheels to install first")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, nargs="+",
                   help=f"batches to time (default {' '.join(map(str, BATCHES))}; --quick: 1 32)")
    p.add_argument("--seconds", type=float, default=2.0, help="timing per variant and batch")
    p.add_argument("--quick", action="store_true", help="batches 1 and 32, no AOTInductor")
    p.add_argument("--no-build", action="store_true", help="use an already importable ubc")
    p.add_argument("--device", default="cuda", help="cuda (the check), or cpu: a smoke test "
                   "of this script on a machine without a GPU (fp32 variants only)")
    args = p.parse_args(argv)
    args.batches = args.batches or ([1, 32] if args.quick else list(BATCHES))
    if min(args.batches) < 1:
        p.error("--batches must be positive")
    results = run(args)  # gpu_check.json / .md are written after every row
    print(markdown(results, args.batches))
    return 0 if results.get("rows") else 1


if __name__ == "__main__":
    sys.exit(main())
