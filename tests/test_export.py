"""Exporters and ``ubc-export``: what each artifact is, that writes are atomic, the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_bundle

from ubc.bundle import Bundle, sha256_of
from ubc.errors import BundleError

pytestmark = pytest.mark.usefixtures("single_torch_thread")



def test_every_file_is_recorded_with_its_sha256(exported_bundle: Path) -> None:
    bundle = Bundle(exported_bundle)
    assert set(bundle.meta["files"]) == {"weights.pt", "model.ts", "model.onnx"}
    for name, sha in bundle.meta["files"].items():
        assert sha256_of(exported_bundle / name) == sha
    weights = bundle.meta["files"]["weights.pt"]
    for name in ("model.ts", "model.onnx"):
        entry = bundle.meta["artifacts"][name]
        assert entry["weights_sha256"] == weights and entry["input_size"] == [64, 64]
    assert not list(exported_bundle.glob(".*.tmp"))


def test_torchscript_runs_with_torch_jit_load_alone(exported_bundle: Path) -> None:
    # No project code and no segmentation_models_pytorch: only torch.
    code = f"""
import json, sys
sys.modules["ubc"] = None
sys.modules["segmentation_models_pytorch"] = None
import torch
extra = {{"ubc_meta.json": ""}}
model = torch.jit.load({str(exported_bundle / "model.ts")!r}, _extra_files=extra)
with torch.no_grad():
    cls, mask = model(torch.zeros(3, 1, 64, 64))
print(json.dumps([list(cls.shape), list(mask.shape), json.loads(extra["ubc_meta.json"])]))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env=env).stdout.strip().splitlines()[-1]
    cls_shape, mask_shape, meta = json.loads(out)
    assert cls_shape == [3, 2] and mask_shape == [3, 1, 64, 64]
    assert meta["preprocessing"]["size"] == [64, 64] and meta["arch"] == "ubc-resnet34"


def test_onnx_names_dynamic_batch_opset_and_metadata(exported_bundle: Path) -> None:
    import onnx

    model = onnx.load(str(exported_bundle / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset >= 17
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["class_logits", "mask_logits"]
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]]
    assert dims == [["batch", 1, 64, 64], ["batch", 2], ["batch", 1, 64, 64]]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["ubc.preprocessing"])["size"] == [64, 64]
    assert not model.graph.initializer or all(
        not t.HasField("data_location") or t.data_location == onnx.TensorProto.DEFAULT
        for t in model.graph.initializer)  # one file, no external data


def test_killed_export_leaves_the_bundle_as_it_was(exported_bundle: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from ubc.export import onnx as onnx_export

    path = copy_bundle(exported_bundle, tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def dies_half_way(model: object, x: object, out: Path, opset: int) -> None:
        out.write_bytes(b"half an onnx file")
        raise KeyboardInterrupt  # what a Ctrl-C in the middle of the export raises

    monkeypatch.setattr(onnx_export, "_export", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        onnx_export.to_onnx(Bundle(path))
    after = {p.name: p.read_bytes() for p in path.iterdir()}
    assert after == before  # same files, same bytes, no temporary left behind


def test_export_refuses_a_model_without_mask_head_and_bad_examples(tmp_path: Path,
                                                                   engine_bundle: Path) -> None:
    from ubc.bundle import Preprocessing, create_bundle
    from ubc.export import export, exporter
    from ubc.model import build_model

    baseline = create_bundle(tmp_path / "base.ubc", arch="resnet34",
                             state_dict=build_model("resnet34").state_dict(),
                             preprocessing=Preprocessing(size=(64, 64)))
    with pytest.raises(ValueError, match="no mask head"):
        export(baseline, ("onnx",))
    with pytest.raises(ValueError, match=r"\[B, 1, 64, 64\]"):
        exporter("torchscript")(Bundle(engine_bundle), example=np.zeros((2, 1, 32, 32)))
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        exporter("tflite")
    with pytest.raises(ValueError, match="opset must be >= 17"):
        exporter("onnx")(Bundle(engine_bundle), opset=13)


def test_calibration_batches_and_tensorrt_options() -> None:
    from ubc.export.tensorrt import CalibrationBatches, TensorRTOptions

    slices = np.arange(10 * 64 * 64, dtype=np.float32).reshape(10, 1, 64, 64)
    batches = list(CalibrationBatches(slices, 4, (64, 64)))
    assert len(batches) == 2 and all(b.shape == (4, 1, 64, 64) for b in batches)
    np.testing.assert_array_equal(batches[1], slices[4:8])
    with pytest.raises(ValueError, match="at least one batch of 16"):
        CalibrationBatches(slices, 16, (64, 64))
    with pytest.raises(ValueError, match=r"\[N, 1, 32, 32\]"):
        CalibrationBatches(slices, 4, (32, 32))
    assert TensorRTOptions(max_batch=64).optimal_batch == 64
    with pytest.raises(ValueError, match="opt_batch"):
        TensorRTOptions(max_batch=8, opt_batch=16)
    with pytest.raises(ValueError, match="precision"):
        TensorRTOptions(precision="int4")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="tensorrt is installed: the missing-package path cannot be shown")
def test_tensorrt_export_without_tensorrt_gives_the_install_hint(exported_bundle: Path,
                                                                 capsys: pytest.CaptureFixture[str]
                                                                 ) -> None:
    from ubc.cli.export import main

    assert main([str(exported_bundle), "--tensorrt", "--precision", "fp16"]) == 2
    assert "pip install ubc[tensorrt]" in capsys.readouterr().err


def test_cli_check_prints_table_and_records_parity(exported_bundle: Path, tmp_path: Path,
                                                   engine_slices: np.ndarray,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from ubc.cli.export import main

    path = copy_bundle(exported_bundle, tmp_path)
    slices = tmp_path / "slices.npy"
    np.save(slices, engine_slices)
    assert main([str(path), "--check", "--device", "cpu", "--slices-from", str(slices)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "model.ts" in out and "FAIL" not in out  # bf16: a gate
    assert "skipped aoti (cpu, fp32)" in out  # no package in this bundle
    parity = Bundle(path).meta["parity"]
    assert parity["onnxruntime:cpu:fp32:model.onnx"]["passed"] is True
    assert parity["torch:cpu:fp32:model.ts"]["slices"] == 64


def test_cli_usage_errors(tmp_path: Path, exported_bundle: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    from ubc.cli.export import main

    assert main([str(tmp_path / "missing.ubc")]) == 2
    assert "not a UBC bundle" in capsys.readouterr().err
    assert main([str(exported_bundle), "--check", "--check-slices", "8"]) == 2
    assert ">= 64" in capsys.readouterr().err
    assert main([str(exported_bundle), "--check", "--slices-from",
                 str(tmp_path / "nope.npy")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(exported_bundle), "--retime"])
    assert exit_info.value.code == 2 and "--retime goes with --cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_aoti_package_round_trip(exported_bundle: Path, tmp_path: Path,
                                 engine_slices: np.ndarray) -> None:
    """torch.export + AOTInductor for the CPU: compiles C++ with the system compiler (about a
    minute at 64 x 64 on 2 cores), then runs without the project's model code."""
    from ubc.engine import load
    from ubc.export.aoti import to_aoti
    from ubc.parity import compare

    path = copy_bundle(exported_bundle, tmp_path)
    result = to_aoti(Bundle(path), device="cpu", max_batch=8)
    assert result.name.startswith("model.cpu-") and result.name.endswith(".pt2")
    parity = compare(path, "aoti", engine_slices, device="cpu", threads=1)
    assert parity.passed, parity.failures
    with load(path, backend="aoti", device="cpu") as engine:
        assert engine.max_batch == 8
        assert engine.infer(engine_slices[:1])[0].shape == (1, 2)
        assert engine.infer(engine_slices[:19])[1].shape == (19, 1, 64, 64)
    with pytest.raises(ValueError, match="within 1..8"):
        load(path, backend="aoti", device="cpu", max_batch=16)
    # the package carries the settings it was compiled with; meta.json edited by hand after
    # that is refused, as for every engine
    meta = json.loads((path / "meta.json").read_text())
    meta["class_names"] = ["HGG", "LGG"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"\.pt2: its ubc.class_names .* differs"):
        load(path, backend="aoti", device="cpu")


class _TimingCacheConfig:
    """TensorRT's IBuilderConfig as far as timing caches go: ``set_timing_cache`` returns
    False for a cache serialised on another device (here: any non-empty one)."""

    def __init__(self) -> None:
        self.attached: bytes | None = None

    def create_timing_cache(self, data: bytes) -> bytes:
        return bytes(data)

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        if cache:
            return False
        self.attached = cache
        return True


def test_timing_cache_from_another_device_is_replaced(exported_bundle: Path,
                                                      tmp_path: Path) -> None:
    from ubc.artifacts import with_artifact
    from ubc.export.tensorrt import _timing_cache

    bundle = Bundle(copy_bundle(exported_bundle, tmp_path))
    name = "timing.other-gpu.sm80.trt10.8.0.cache"
    bundle.write_file(name, lambda tmp: tmp.write_bytes(b"from an A100"),
                      artifacts=with_artifact(bundle.meta, name, format="timing-cache"))
    config = _TimingCacheConfig()
    assert _timing_cache(config, bundle, name) == b"" and config.attached == b""
