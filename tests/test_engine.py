"""Engines: one interface over every backend, batching, the auto choice, refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_bundle, one_torch_thread

from ubc.bundle import Bundle
from ubc.engine import BACKENDS, load
from ubc.errors import BundleError

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
# One thread each: the shared 2-core machine (see conftest.one_torch_thread).
CPU_BACKENDS = [
    ("torch", {"artifact": "torchscript", "threads": 1}),
    ("torch", {"artifact": "eager", "threads": 1}),
    ("onnxruntime", {"threads": 1}),
    pytest.param("openvino", {"threads": 1}, marks=pytest.mark.skipif(
        not HAS_OPENVINO, reason="openvino not installed (pip install ubc[openvino])")),
]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _has_gpu() -> bool:
    from ubc.devices import cuda_device_count

    return cuda_device_count() > 0



def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def reference(exported_bundle: Path, engine_slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from ubc.parity import reference_outputs

    with one_torch_thread():
        return reference_outputs(Bundle(exported_bundle), engine_slices)


@pytest.mark.parametrize(("backend", "options"), CPU_BACKENDS)
def test_cpu_backend_matches_eager(exported_bundle: Path, engine_slices: np.ndarray,
                                   reference: tuple[np.ndarray, np.ndarray], backend: str,
                                   options: dict[str, object]) -> None:
    with load(exported_bundle, backend=backend, device="cpu", max_batch=16,
              **options) as engine:
        class_logits, mask_logits = engine.infer(engine_slices)
    assert class_logits.dtype == np.float32 and mask_logits.dtype == np.float32
    assert class_logits.shape == (64, 2) and mask_logits.shape == (64, 1, 64, 64)
    scale = max(1.0, float(np.abs(reference[0]).max()))
    assert np.abs(class_logits - reference[0]).max() <= 1e-3 * scale
    assert np.abs(mask_logits - reference[1]).max() <= 1e-3 * max(1.0, np.abs(reference[1]).max())


@pytest.mark.parametrize(("backend", "options"), CPU_BACKENDS[:1] + CPU_BACKENDS[2:])
def test_batch_one_odd_and_oversize_batches_agree(exported_bundle: Path,
                                                  engine_slices: np.ndarray, backend: str,
                                                  options: dict[str, object]) -> None:
    batch = engine_slices[:7]
    with load(exported_bundle, backend=backend, device="cpu", max_batch=3, **options) as engine:
        whole = engine.infer(batch)  # 7 > max_batch 3: split into 3 + 3 + 1
        singles = [engine.infer(batch[i:i + 1]) for i in range(len(batch))]
        odd = engine.infer(batch[:5])
    for k in range(2):
        one_by_one = np.concatenate([s[k] for s in singles])
        np.testing.assert_allclose(whole[k], one_by_one, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(odd[k], whole[k][:5], rtol=1e-4, atol=1e-4)


def test_input_is_checked(engine_bundle: Path) -> None:
    with load(engine_bundle, backend="torch", device="cpu") as engine:
        with pytest.raises(TypeError, match="float32"):
            engine.infer(np.zeros((1, 1, 64, 64), np.float64))
        with pytest.raises(ValueError, match=r"\[B>0, 1, 64, 64\]"):
            engine.infer(np.zeros((1, 1, 32, 32), np.float32))
        with pytest.raises(ValueError, match="B>0"):
            engine.infer(np.zeros((0, 1, 64, 64), np.float32))
        # A strided view is accepted (made contiguous).
        view = np.zeros((2, 1, 64, 128), np.float32)[..., ::2]
        assert engine.infer(view)[0].shape == (2, 2)
    with pytest.raises(RuntimeError, match="closed"):
        engine.infer(np.zeros((1, 1, 64, 64), np.float32))


def test_auto_picks_fastest_cpu_runtime_and_says_why(exported_bundle: Path) -> None:
    engine = load(exported_bundle, device="cpu")
    with engine:
        assert engine.backend == "onnxruntime" and engine.artifact == "model.onnx"
        assert engine.selection.backend == "onnxruntime"
        assert engine.selection.rejected == ()  # the first candidate was taken


def test_auto_on_weights_only_bundle_is_eager_torch(engine_bundle: Path) -> None:
    with load(engine_bundle) as engine:  # no GPU here: device auto -> cpu
        assert (engine.backend, engine.artifact, engine.device) == ("torch", "weights.pt", "cpu")
        labels = [label for label, _ in engine.selection.rejected]
        assert "onnxruntime" in labels and "torch(torchscript)" in labels


def test_corrupted_artifact_is_refused_and_auto_falls_back(exported_bundle: Path,
                                                           tmp_path: Path) -> None:
    path = copy_bundle(exported_bundle, tmp_path)
    _flip_byte(path / "model.onnx")
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        load(path, backend="onnxruntime", device="cpu")
    with load(path, device="cpu") as engine:
        assert (engine.backend, engine.artifact) == ("torch", "model.ts")
        reasons = dict(engine.selection.rejected)
        assert "corrupted" in reasons["onnxruntime"]
    _flip_byte(path / "model.ts")
    with load(path, device="cpu") as engine:  # only the eager weights remain usable
        assert engine.artifact == "weights.pt"
    _flip_byte(path / "weights.pt")
    with pytest.raises(BundleError, match="no backend can run it"):
        load(path, device="cpu")


def test_artifact_from_other_weights_is_refused(exported_bundle: Path, tmp_path: Path) -> None:
    import torch

    path = copy_bundle(exported_bundle, tmp_path)
    bundle = Bundle(path)
    state = bundle.load_state_dict()
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    bundle.write_file("weights.pt", lambda tmp: torch.save(state, tmp))
    with pytest.raises(BundleError, match="exported from other weights"):
        load(path, backend="onnxruntime", device="cpu")
    with load(path, device="cpu") as engine:
        assert engine.artifact == "weights.pt"


def test_failed_parity_record_is_skipped_and_required_parity(exported_bundle: Path,
                                                             tmp_path: Path) -> None:
    from ubc.engine.registry import parity_key

    path = copy_bundle(exported_bundle, tmp_path)
    bundle = Bundle(path)
    sha = bundle.meta["files"]["model.onnx"]
    records = {parity_key(b, "cpu", "fp32", "model.onnx"): {
        "passed": False, "artifact": "model.onnx", "sha256": sha}
        for b in ("onnxruntime", "openvino")}
    bundle.update_meta(parity=records)
    with load(path, device="cpu") as engine:
        assert engine.artifact == "model.ts"
        assert "parity" in dict(engine.selection.rejected)["onnxruntime"]
    with load(path, device="cpu", require_parity=True) as engine:
        assert engine.artifact == "weights.pt"  # TorchScript has no parity record
        assert engine.selection.parity == "passed"


def test_bad_arguments_name_the_fix(engine_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend 'tflite'"):
        load(engine_bundle, backend="tflite")
    with pytest.raises(ValueError, match="belong to one backend"):
        load(engine_bundle, artifact="eager")
    with pytest.raises(ValueError, match="precision must be one of"):
        load(engine_bundle, precision="fp8")
    with pytest.raises(ValueError, match="onnx --onnx|ubc-export .* --onnx"):
        load(engine_bundle, backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match="fp16"):
        load(engine_bundle, backend="torch", device="cpu", precision="fp16")
    with pytest.raises(BundleError, match="not a UBC bundle"):
        load(tmp_path)
    if not _has_gpu():
        with pytest.raises(ValueError, match="0 usable CUDA GPU"):
            load(engine_bundle, device="cuda")


def test_backend_modules_are_imported_lazily() -> None:
    code = ("import sys, ubc.engine, ubc.engine.tensorrt_backend, ubc.cuda_memory; "
            "print(json.dumps(sorted(m for m in ('torch', 'onnxruntime', 'openvino', "
            "'tensorrt') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == []
    assert set(BACKENDS) == {"torch", "onnxruntime", "openvino", "aoti", "tensorrt"}


def test_auto_choice_imports_torch_only_when_torch_is_the_pick(exported_bundle: Path) -> None:
    # device and backend "auto": the GPU question goes to the driver, not to torch, and on
    # this CPU-only machine ONNX Runtime is the pick (issue 26 item 5)
    code = ("import json, sys; from ubc.engine import load; "
            f"engine = load({str(exported_bundle)!r}); "
            "print(json.dumps([engine.backend, engine.device, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    if _has_gpu():
        pytest.skip("a GPU is usable here: auto rightly picks a GPU engine")
    assert json.loads(out) == ["onnxruntime", "cpu", False]


def test_repr_names_backend_and_artifact(engine_bundle: Path) -> None:
    with load(engine_bundle, backend="torch", device="cpu", max_batch=4) as engine:
        assert repr(engine) == ("TorchEngine(backend='torch', artifact='weights.pt', "
                                "device='cpu', precision='fp32', max_batch=4)")


# --- CUDA and TensorRT: written against the real APIs, run where a GPU is lent -----------

def test_cuda_memory_reports_missing_gpu_clearly() -> None:
    from ubc import cuda_memory

    if _has_gpu():
        values = np.arange(1000, dtype=np.float32)
        np.testing.assert_array_equal(cuda_memory.round_trip(values), values)
        return
    with pytest.raises(cuda_memory.CudaError, match=r"cudaMalloc\w* failed|cudaStream\w+ failed"):
        cuda_memory.round_trip(np.arange(4, dtype=np.float32))
    with pytest.raises(cuda_memory.CudaError, match="cudaMalloc failed"):
        cuda_memory.DeviceBuffer(1024)
    with pytest.raises(ValueError, match="nbytes"):
        cuda_memory.DeviceBuffer(0)


def test_plan_mismatch_names_both_machines() -> None:
    from ubc.artifacts import GpuInfo, parse_plan_name, plan_name
    from ubc.engine.tensorrt_backend import plan_mismatch

    h100 = GpuInfo("NVIDIA H100 80GB HBM3", 9, 0)
    name = plan_name(h100, "10.8.0.43", "fp16")
    assert name == "model.nvidia-h100-80gb-hbm3.sm90.trt10.8.0.43.fp16.plan"
    assert parse_plan_name(name) == {"gpu": "nvidia-h100-80gb-hbm3", "cc": "90",
                                     "trt": "10.8.0.43", "precision": "fp16"}
    entry = {"gpu": h100.name, "compute_capability": "90", "tensorrt": "10.8.0.43"}
    assert plan_mismatch(entry, h100, "10.8.0.43") is None
    message = plan_mismatch(entry, GpuInfo("NVIDIA L4", 8, 9), "10.8.0.43")
    assert message is not None and "H100" in message and "NVIDIA L4 (sm89" in message
    assert "TensorRT 10.9" in (plan_mismatch(entry, h100, "10.9.0.34") or "")


def test_tensorrt_plan_for_other_gpu_is_refused_with_rebuild_command(
        exported_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ubc.artifacts import GpuInfo, plan_name, with_artifact
    from ubc.engine import tensorrt_backend

    path = copy_bundle(exported_bundle, tmp_path)
    bundle = Bundle(path)
    l4 = GpuInfo("NVIDIA L4", 8, 9)
    name = plan_name(l4, "10.8.0.43", "fp16")
    bundle.write_file(name, lambda tmp: tmp.write_bytes(b"not a real plan"),
                      artifacts=with_artifact(bundle.meta, name, gpu=l4.name,
                                              compute_capability="89", tensorrt="10.8.0.43",
                                              precision="fp16"))
    # Pretend this is an H100 with TensorRT 10.8 installed: the L4 plan must be refused.
    monkeypatch.setattr(tensorrt_backend.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(tensorrt_backend, "gpu_info", lambda index: GpuInfo("NVIDIA H100", 9, 0))
    monkeypatch.setattr(tensorrt_backend, "tensorrt_version", lambda: "10.8.0.43")
    reason = tensorrt_backend.TensorRTEngine.unavailable(bundle, "cuda", "fp16")
    assert reason is not None
    assert "built for NVIDIA L4 (sm89, TensorRT 10.8.0.43)" in reason
    assert f"ubc-export {path} --tensorrt --precision fp16" in reason


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("options", [{"precision": "fp32"}, {"precision": "fp16"},
                                     {"precision": "fp16", "half_weights": True,
                                      "artifact": "eager"},
                                     {"precision": "fp32", "cuda_graphs": True}])
def test_torch_cuda(exported_bundle: Path, engine_slices: np.ndarray,
                    reference: tuple[np.ndarray, np.ndarray], options: dict[str, object]) -> None:
    from ubc.parity import TOLERANCES, measure

    with load(exported_bundle, backend="torch", device="cuda", max_batch=8,
              **options) as engine:
        got = engine.infer(engine_slices)
        again = engine.infer(engine_slices)  # graphs replay with new data
    figures = measure(reference, got)
    tol = TOLERANCES[str(options["precision"])]
    assert figures["max_rel_class_logits"] <= tol.class_logits
    assert figures["mask_dice"] >= tol.mask_dice
    np.testing.assert_allclose(got[0], again[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not _has_gpu(),
                    reason="needs a CUDA GPU and tensorrt (pip install ubc[tensorrt])")
def test_tensorrt_fp16_round_trip(exported_bundle: Path, engine_slices: np.ndarray,
                                  tmp_path: Path) -> None:
    from ubc.export.tensorrt import TensorRTOptions, to_tensorrt
    from ubc.parity import compare

    path = copy_bundle(exported_bundle, tmp_path)
    to_tensorrt(Bundle(path), options=TensorRTOptions(precision="fp16", max_batch=16,
                                                      opt_batch=8))
    result = compare(path, "tensorrt", engine_slices, device="cuda", precision="fp16")
    assert result.passed, result.failures
    with load(path, device="cuda", precision="fp16") as engine:
        assert engine.backend == "tensorrt"
        assert engine.infer(engine_slices[:1])[0].shape == (1, 2)
        assert engine.infer(engine_slices[:37])[1].shape == (37, 1, 64, 64)  # > max_batch
    # a plan keeps its ONNX source's settings in its meta.json record: an edited meta.json
    # no longer matches them
    bundle = Bundle(path)
    bundle.update_meta(preprocessing={**bundle.meta["preprocessing"], "norm": "percentile"})
    with pytest.raises(BundleError, match=r"\.plan: its ubc.preprocessing .* differs"):
        load(path, backend="tensorrt", device="cuda", precision="fp16")


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not _has_gpu(),
                    reason="needs a CUDA GPU and tensorrt (pip install ubc[tensorrt])")
# TensorRT 10 deprecates the implicit-quantisation calibrator API and says so through its C
# layer as DeprecationWarnings, which `filterwarnings = error` would turn into failures.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tensorrt_int8_calibrated_round_trip(exported_bundle: Path, engine_slices: np.ndarray,
                                             tmp_path: Path) -> None:
    from ubc.export.tensorrt import TensorRTOptions, to_tensorrt
    from ubc.parity import compare

    path = copy_bundle(exported_bundle, tmp_path)
    result = to_tensorrt(Bundle(path), options=TensorRTOptions(precision="int8", max_batch=16,
                                                               opt_batch=8),
                         calib=engine_slices)
    assert Bundle(path).has("calib.int8.cache") and result.description["precision"] == "int8"
    parity = compare(path, "tensorrt", engine_slices, device="cuda", precision="int8")
    assert parity.mask_dice > 0.5, parity  # random weights: int8 is measured, not gated here


def _timed(bundle: Bundle, speeds: dict[str, float], cpu_class: str | None = None) -> None:
    """Timing records as ``ubc-export --cpu`` writes them (variant:precision -> slices/s)."""
    from ubc.devices import cpu_class as here

    records = {}
    for key, speed in speeds.items():
        artifact = {"onnxruntime:int8": "model.int8.onnx", "torch:fp32": "weights.pt",
                    "torchscript:fp32": "model.ts"}.get(key, "model.onnx")
        records[key] = {"slices_per_s": speed, "artifact": artifact,
                        "sha256": bundle.meta["files"].get(artifact), "batch": 32}
    bundle.update_meta(timing={cpu_class or here(): records})


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_auto_picks_the_fastest_recorded_for_this_cpu_class(exported_bundle: Path,
                                                           tmp_path: Path) -> None:
    path = copy_bundle(exported_bundle, tmp_path)
    bundle = Bundle(path)
    with load(bundle, device="cpu", threads=1) as engine:  # nothing timed: the static order
        assert engine.backend == "onnxruntime"
    _timed(bundle, {"onnxruntime:fp32": 20.0, "openvino:fp32": 25.0, "torch:fp32": 15.0})
    with load(bundle, device="cpu", threads=1) as engine:
        assert (engine.backend, engine.precision) == ("openvino", "fp32")
        assert engine.selection.rejected == ()
    from ubc.devices import cpu_class

    other = "avx512-vnni" if cpu_class() == "avx2" else "avx2"
    _timed(bundle, {"openvino:fp32": 25.0}, cpu_class=other)  # another CPU's figures
    with load(bundle, device="cpu", threads=1) as engine:
        assert engine.backend == "onnxruntime"
    _timed(bundle, {"openvino:fp32": 25.0})
    bundle.meta["timing"][next(iter(bundle.meta["timing"]))]["openvino:fp32"]["sha256"] = "0"
    bundle.update_meta()  # a timing of an older model.onnx is not this one's
    with load(bundle, device="cpu", threads=1) as engine:
        assert engine.backend == "onnxruntime"


def test_torchscript_is_optimised_except_under_autocast(exported_bundle: Path) -> None:
    from ubc.engine.torch_backend import TorchEngine, optimizes_for_inference

    # On CUDA the pass fuses conv+relu into cuDNN ops autocast does not cover (issue 14).
    assert optimizes_for_inference(autocast=False) and not optimizes_for_inference(True)
    with load(exported_bundle, backend="torch", artifact="torchscript", device="cpu") as engine:
        assert isinstance(engine, TorchEngine) and engine.optimized


def test_cpu_class_and_native_bf16_from_flags() -> None:
    from ubc.devices import cpu_class, native_bf16

    xeon = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile",
                      "amx_int8", "amx_bf16"})
    epyc = frozenset({"avx2", "fma", "sse4_2"})
    assert (cpu_class(xeon), native_bf16(xeon)) == ("amx", True)
    assert (cpu_class(epyc), native_bf16(epyc)) == ("avx2", False)
    assert cpu_class(xeon - {"amx_tile"}) == "avx512-vnni"
    assert cpu_class(frozenset({"avx2", "avx_vnni"})) == "avx2-vnni"
    assert native_bf16(frozenset()) is None  # unknown: the runtime is asked instead


def test_isa_cap_files_this_cpu_as_the_capped_class(monkeypatch: pytest.MonkeyPatch) -> None:
    from ubc.devices import ISA_CAP_ENV, _proc_flags, cpu_class, native_bf16

    if "avx512f" not in _proc_flags():
        pytest.skip("this CPU has no AVX-512 to cap")
    monkeypatch.setenv(ISA_CAP_ENV, "AVX2")
    assert (cpu_class(), native_bf16()) == ("avx2", False)
    monkeypatch.setenv(ISA_CAP_ENV, "AVX512_CORE")
    assert cpu_class() == "avx512"


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_honours_the_isa_cap_of_ubc_bench() -> None:
    """What ``ubc-bench --max-isa avx2`` relies on: OpenVINO, started under the cap, no
    longer offers bf16 on a CPU that has it."""
    import subprocess
    import sys

    from ubc.devices import native_bf16

    if not native_bf16():
        pytest.skip("this CPU has no native bf16 to cap away")
    script = ("import sys; from ubc.cli.bench import cap_isa; cap_isa('avx2'); "
              "import openvino as ov; "
              "print(ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert "FP32" in out and "BF16" not in out, out


def test_gpu_check_records_after_every_section(tmp_path: Path) -> None:
    import importlib.util as iu

    spec = iu.spec_from_file_location("gpu_check", Path(__file__).resolve().parents[1]
                                      / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = iu.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    Recorder, opt_batch_for = gpu_check.Recorder, gpu_check.opt_batch_for
    assert opt_batch_for([1, 8]) == 8 and opt_batch_for([1, 8, 32, 128]) == 32
    rec = Recorder(tmp_path, [1, 8])

    def broken() -> None:
        raise RuntimeError("torch 2.11 says no")

    assert rec.guarded("onnx export", broken) is None
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["errors"]["onnx export"] == "RuntimeError: torch 2.11 says no"
    assert "onnx export: RuntimeError" in (tmp_path / "gpu_check.md").read_text()
    assert rec.guarded("ok", lambda: 3) == 3


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path: Path) -> None:
    """The whole script in its CPU smoke mode: rows come back, files are written."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py"), "--device",
                          "cpu", "--no-build", "--quick", "--size", "64", "--batches", "1",
                          "2", "--seconds", "0.1", "--out", str(tmp_path / "out"), "--work",
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [r["variant"] for r in saved["rows"]][:2] == ["torch eager fp32", "TorchScript fp32"]
    assert "onnx" not in saved["export_seconds"]  # no TensorRT: no ONNX export


def test_device_strings() -> None:
    from ubc.devices import parse_device, resolve_device

    assert parse_device("cpu") == ("cpu", 0) and parse_device("cuda:1") == ("cuda", 1)
    for bad in ("gpu", "cuda:x", "cpu:0", "CUDA"):
        with pytest.raises(ValueError, match="device must be"):
            parse_device(bad)
    assert resolve_device("auto") == ("cuda" if _has_gpu() else "cpu")
