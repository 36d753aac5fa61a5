"""The one prepared check for a lent GPU machine: build, export, parity, throughput.

It builds the native extension, makes a bundle (a trained one with --bundle, else the real
architecture at 224 x 224 with random weights whose batch-norm statistics come from the
parity slices), exports TorchScript and ONNX, then for every GPU variant it can run
(torch CUDA fp32 / fp16 autocast / fp16 half weights / bf16 / CUDA graphs, TorchScript
fp32 and fp16, the AOTInductor package compiled for this GPU, TensorRT fp32/fp16/int8 where
``import tensorrt`` works) measures parity against eager PyTorch fp32 on the CPU over 64
phantom slices read through ubc.io + ubc.preprocess, and throughput in slices/s at batches
1, 8, 32 and 128. Writes gpu_check.json and gpu_check.md under --out ($OUT) and prints the
table. Every section is guarded: one failing variant is reported, not fatal.

The GPU image has torch (with CUDA), cuda-bindings, onnxruntime, pybind11, scikit-build-core,
cmake and ninja, but not segmentation-models-pytorch nor nibabel (pure-Python wheels that
travel) nor tensorrt (its PyPI libs cannot be fetched on any machine we have). Once, here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux2014_x86_64 -d .whl \\
        segmentation-models-pytorch==0.6.0 nibabel==5.4.2 timm huggingface-hub safetensors

(segmentation-models-pytorch imports timm, huggingface_hub and safetensors at import time;
whether the GPU image has their own dependencies, httpx among them, is not yet verified.)

then one device call (carry [".whl"], timeout about 540 s):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT 2>&1 | tee $OUT/log.txt

(--wheels DIR does the first line itself.) --quick times batches 1 and 32 only and skips
the AOTInductor compile, for a second try inside the device-time budget.
"""

from __future__ import annotations

import argparse
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


def throughput(engine: Any, slices: np.ndarray, batch: int, seconds: float) -> float:
    """Slices/s of ``engine.infer`` (host in, host out: copies included) at ``batch``."""
    reps = -(-batch // len(slices))
    data = np.ascontiguousarray(np.concatenate([slices] * reps)[:batch])
    for _ in range(3):
        engine.infer(data)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        engine.infer(data)
        calls += 1
    return calls * batch / (time.perf_counter() - start)


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
        ("TorchScript fp16 autocast", "torch", "fp16", {"artifact": "torchscript"}),
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.wheels:
        install_wheels(args.wheels)
    results["native"] = build_native() if not args.no_build else "not built (--no-build)"
    log(results["native"])
    sys.path.insert(1, str(ROOT))
    import torch

    from ubc.bundle import Bundle
    from ubc.engine import cuda_memory, load
    from ubc.devices import cuda_device_count, gpu_info
    from ubc.parity import compare, phantom_slices, reference_outputs

    device = args.device
    if device == "cpu":  # a smoke test of this script on a machine without a GPU
        from ubc.artifacts import GpuInfo

        def gpu_info(index: int) -> GpuInfo:  # noqa: F811 - stands in for the GPU query
            return GpuInfo("CPU (smoke test)", 0, 0)
    elif cuda_device_count() == 0:
        results["errors"] = {"gpu": "no usable CUDA GPU on this machine"}
        log("no usable CUDA GPU: nothing to check")
        return results
    gpu = gpu_info(0)
    results["machine"] = {"gpu": gpu.name, "sm": gpu.sm, "torch": torch.__version__,
                          "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    log(f"GPU {gpu.name} ({gpu.sm}), torch {torch.__version__}")
    if device != "cpu":
        roundtrip = cuda_memory.round_trip(np.arange(1 << 20, dtype=np.float32))
        results["cuda_memory_round_trip"] = bool((roundtrip == np.arange(1 << 20)).all())

    from ubc.bundle import Preprocessing

    size = args.size
    try:
        slices = phantom_slices(Preprocessing(size=(size, size)), 64)
        results["slices"] = "64 phantom slices via ubc.io + ubc.preprocess"
    except Exception as exc:  # native build or nibabel missing: NumPy reference instead
        log(f"phantom slices through ubc.io failed ({exc}); using the NumPy reference")
        slices = phantom_slices_fallback(size)
        results["slices"] = "64 phantom slices via ubc.preprocess_reference (fallback)"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = Bundle(args.bundle) if args.bundle else make_bundle(work / "gpu.ubc", slices)
    from ubc.export import exporter

    exports: dict[str, float] = {}
    for fmt in ("torchscript", "onnx"):
        exports[fmt] = exporter(fmt)(bundle, example=slices[:2]).seconds
    if not args.quick:
        started = time.perf_counter()
        guarded(results, "aoti export", lambda: exporter("aoti")(
            bundle, device=device, max_batch=max(args.batches), example=slices[:2]))
        exports["aoti"] = time.perf_counter() - started
    has_trt = device != "cpu" and guarded(
        results, "tensorrt import", lambda: __import__("tensorrt")) is not None
    if has_trt:
        from ubc.export.tensorrt import TensorRTOptions

        for precision in ("fp32", "fp16", "int8"):
            started = time.perf_counter()
            guarded(results, f"tensorrt {precision} build", lambda p=precision: exporter(
                "tensorrt")(bundle, options=TensorRTOptions(
                    precision=p, max_batch=max(args.batches), opt_batch=32),
                    calib=slices if p == "int8" else None))
            exports[f"tensorrt {precision}"] = time.perf_counter() - started
    results["export_seconds"] = {k: round(v, 1) for k, v in exports.items()}
    log(f"exports: {results['export_seconds']}")

    reference = reference_outputs(bundle, slices)
    rows = []
    chosen = variants(not args.quick, has_trt)
    if device == "cpu":
        chosen = [v for v in chosen if v[2] == "fp32" and not v[3].get("cuda_graphs")]
    for label, backend, precision, options in chosen:
        def one(label: str = label, backend: str = backend, precision: str = precision,
                options: dict[str, Any] = options) -> dict[str, Any]:
            parity = compare(bundle, backend, slices, device=device, precision=precision,
                             reference=reference, source=results["slices"], **options)
            row: dict[str, Any] = {"variant": label, "backend": backend,
                                   "precision": precision, "parity": parity.to_json(),
                                   "slices_per_s": {}}
            with load(bundle, backend=backend, device=device, precision=precision,
                      max_batch=max(args.batches), **options) as engine:
                row["artifact"] = engine.artifact
                for batch in args.batches:
                    row["slices_per_s"][str(batch)] = round(
                        throughput(engine, slices, batch, args.seconds), 1)
            if device != "cpu":
                torch.cuda.empty_cache()
            log(f"{label}: {row['slices_per_s']} parity "
                f"{'pass' if parity.passed else 'FAIL ' + '; '.join(parity.failures)}")
            return row

        row = guarded(results, label, one)
        if row is not None:
            rows.append(row)
    results["rows"] = rows
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
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--seconds", type=float, default=2.0, help="timing per variant and batch")
    p.add_argument("--quick", action="store_true", help="batches 1 and 32, no AOTInductor")
    p.add_argument("--no-build", action="store_true", help="use an already importable ubc")
    p.add_argument("--device", default="cuda", help="cuda (the check), or cpu: a smoke test "
                   "of this script on a machine without a GPU (fp32 variants only)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches = [1, 32]
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results, args.batches)
    (args.out / "gpu_check.md").write_text(table + "\n")
    print(table)
    return 0 if results.get("rows") else 1


if __name__ == "__main__":
    sys.exit(main())
