"""INT8 CPU artifacts (ONNX Runtime QDQ, OpenVINO through NNCF), their parity gates and the
automatic choice by recorded timing (issue 14)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_bundle

from ubc.bundle import Bundle, sha256_of
from ubc.engine import load
from ubc.parity import compare, record_parity

pytestmark = pytest.mark.usefixtures("single_torch_thread")
HAS_NNCF = importlib.util.find_spec("nncf") is not None and \
    importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory: pytest.TempPathFactory, exported_bundle: Path,
                engine_slices: np.ndarray) -> Path:
    """``exported_bundle`` + model.int8.onnx calibrated on 32 of the engine slices."""
    from conftest import one_torch_thread

    from ubc.export import export

    path = copy_bundle(exported_bundle, tmp_path_factory.mktemp("int8"))
    with one_torch_thread():
        export(Bundle(path), ("int8-onnx",), calib=engine_slices[::2])
    return path


def test_int8_onnx_is_per_channel_qdq_recorded_and_runs(int8_bundle: Path,
                                                        engine_slices: np.ndarray) -> None:
    import onnx

    bundle = Bundle(int8_bundle)
    entry = bundle.meta["artifacts"]["model.int8.onnx"]
    assert bundle.meta["files"]["model.int8.onnx"] == sha256_of(int8_bundle / "model.int8.onnx")
    assert (entry["precision"], entry["quant_format"], entry["calibration_slices"],
            entry["calibration_batch"], entry["ranges"]) == \
        ("int8", "QDQ", 32, 8, "min/max of all batches")
    model = onnx.load(str(int8_bundle / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    # every convolution but the input one, the encoder's last stage (7) and the mask head
    assert entry["fp32_nodes"] == 10  # ... and the class head's Gemm stay fp32
    assert ops.count("QuantizeLinear") > 35 and "Conv" in ops
    inits = {i.name: i for i in model.graph.initializer}
    weight_scales = [inits[n.input[1]] for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[1] in inits
                     and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1]
    # per output channel, for the weights and the biases of each of the 38 int8 convolutions
    assert len(weight_scales) == 2 * (48 - 10)
    with load(int8_bundle, backend="onnxruntime", precision="int8", threads=1) as engine:
        assert engine.artifact == "model.int8.onnx"
        got = engine.infer(engine_slices)
    with load(int8_bundle, backend="onnxruntime", threads=1) as engine:
        ref = engine.infer(engine_slices)
    assert got[1].shape == ref[1].shape
    # Random (batch-norm calibrated) weights: int8 tracks fp32, the gates judge how well.
    assert np.corrcoef(got[1].ravel(), ref[1].ravel())[0, 1] > 0.9


def test_int8_from_other_weights_or_without_calibration_is_refused(
        int8_bundle: Path, tmp_path: Path) -> None:
    import torch

    from ubc.errors import BundleError
    from ubc.export import exporter

    path = copy_bundle(int8_bundle, tmp_path)
    bundle = Bundle(path)
    with pytest.raises(ValueError, match="at least one batch of 8"):
        exporter("int8-onnx")(bundle, calib=np.zeros((3, 1, 64, 64), np.float32))
    state = {k: v * 2 if v.is_floating_point() else v
             for k, v in bundle.load_state_dict().items()}
    bundle.write_file("weights.pt", lambda tmp: torch.save(state, tmp))
    with pytest.raises(BundleError, match="other weights.*--cpu --calib"):
        load(path, backend="onnxruntime", precision="int8")


def _time(bundle: Bundle, speeds: dict[str, tuple[float, str]]) -> None:
    from ubc.devices import cpu_class

    bundle.update_meta(timing={cpu_class(): {
        key: {"slices_per_s": speed, "artifact": artifact,
              "sha256": bundle.meta["files"][artifact]}
        for key, (speed, artifact) in speeds.items()}})


def test_int8_is_picked_only_when_gated_and_timed_fastest(
        int8_bundle: Path, tmp_path: Path, engine_slices: np.ndarray,
        caplog: pytest.LogCaptureFixture) -> None:
    path = copy_bundle(int8_bundle, tmp_path)
    bundle = Bundle(path)
    timings = {"onnxruntime:int8": (90.0, "model.int8.onnx"),
               "onnxruntime:fp32": (20.0, "model.onnx")}
    _time(bundle, timings)
    with load(bundle, device="cpu", threads=1) as engine:  # int8 unchecked: not picked
        assert (engine.backend, engine.precision) == ("onnxruntime", "fp32")
        assert "no parity record" in dict(engine.selection.rejected)["onnxruntime int8"]
    result = compare(bundle, "onnxruntime", engine_slices, precision="int8", threads=1)
    passed = replace(result, passed=True, failures=())
    record_parity(bundle, [passed])
    with load(bundle, device="cpu", threads=1) as engine:
        assert (engine.precision, engine.artifact) == ("int8", "model.int8.onnx")
        assert engine.selection.parity == "passed"
    with load(bundle, device="cpu", precision="fp32", threads=1) as engine:
        assert engine.precision == "fp32"  # asked for: the timing orders fp32 ones only
    failed = replace(passed, passed=False, failures=("mask Dice 0.7 < 0.98",))
    record_parity(bundle, [failed])
    with load(bundle, device="cpu", threads=1) as engine:
        assert engine.precision == "fp32"
        assert "failed its parity" in dict(engine.selection.rejected)["onnxruntime int8"]
    with caplog.at_level(logging.WARNING, logger="ubc.engine"):
        with load(bundle, backend="onnxruntime", precision="int8", threads=1) as engine:
            assert engine.precision == "int8"  # forced, with a warning
    assert "failed its parity gate" in caplog.text
    bundle.update_meta(timing={})
    with load(bundle, device="cpu", threads=1) as engine:  # none recorded: the static order
        assert (engine.backend, engine.precision) == ("onnxruntime", "fp32")
    assert "--retime" not in caplog.text


def test_timings_of_another_cpu_class_are_not_used_and_say_so(
        int8_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ubc.devices import cpu_class

    bundle = Bundle(copy_bundle(int8_bundle, tmp_path))
    other = "avx2" if cpu_class() != "avx2" else "amx"
    bundle.update_meta(timing={other: {"onnxruntime:int8": {
        "slices_per_s": 90.0, "artifact": "model.int8.onnx",
        "sha256": bundle.meta["files"]["model.int8.onnx"]}}})
    with caplog.at_level(logging.WARNING, logger="ubc.engine"):
        with load(bundle, device="cpu", threads=1) as engine:  # an AVX2 figure means nothing
            assert (engine.backend, engine.precision) == ("onnxruntime", "fp32")  # here
    assert f"recorded for {other} only, not for this CPU ({cpu_class()})" in caplog.text
    assert f"ubc-export {bundle.path} --cpu --retime" in caplog.text
    bundle.update_meta(timing=7)  # a malformed record is no timing, not a crash
    with load(bundle, device="cpu", threads=1) as engine:
        assert (engine.backend, engine.precision) == ("onnxruntime", "fp32")


def test_case_parity_names_changed_cases() -> None:
    from ubc.parity import case_parity

    ref = {"a": ("ok", "HGG", 0.8), "b": ("ok", "LGG", 0.3), "c": ("no_lesion", None, None)}
    same = case_parity(ref, dict(ref), "phantoms")
    assert same.passed and same.cases == 3 and same.max_abs_p_hgg == 0
    moved = case_parity(ref, {**ref, "b": ("ok", "HGG", 0.55), "c": ("ok", "LGG", 0.2)}, "x")
    assert not moved.passed and moved.changed == ("b: ok/LGG -> ok/HGG",
                                                  "c: no_lesion/None -> ok/LGG")
    assert moved.max_abs_p_hgg == pytest.approx(0.25)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NNCF, reason="nncf/openvino not installed (pip install nncf)")
def test_int8_openvino_ir_through_nncf(int8_bundle: Path, tmp_path: Path,
                                       engine_slices: np.ndarray) -> None:
    from ubc.export import exporter

    path = copy_bundle(int8_bundle, tmp_path)
    bundle = Bundle(path)
    exporter("int8-openvino")(bundle, calib=engine_slices[::2])
    entry = bundle.meta["artifacts"]["model.int8.xml"]
    assert entry["weights_file"] == "model.int8.bin" and bundle.has("model.int8.bin")
    assert (entry["calibration_batch"], entry["calibration_slices"]) == (16, 32)
    assert "layer_choice" not in entry  # no gate given: every layer group in INT8
    # every convolution is quantised (int8 weights, dequantised by a Multiply; an fp32
    # layer reads its weights from a Constant) but the two heads, which write the outputs
    import openvino as ov

    from ubc.export.int8_openvino import fp32_ops

    onnx_graph = ov.Core().read_model(str(path / "model.onnx"))
    kept = fp32_ops(onnx_graph)
    heads = [op.get_friendly_name() for op in onnx_graph.get_ops()
             if op.get_friendly_name() in kept and op.get_type_name() in ("Convolution",
                                                                          "MatMul")]
    assert {"class_logits", "mask_logits"} < set(kept) and len(heads) == 2
    assert entry["fp32_nodes"] == len(kept)
    assert entry["higher_precision_ops"] == sorted(heads)
    weighted = [op for op in ov.Core().read_model(str(path / "model.int8.xml")).get_ops()
                if op.get_type_name() in ("Convolution", "MatMul")]
    assert len(weighted) == len([op for op in onnx_graph.get_ops()
                                 if op.get_type_name() in ("Convolution", "MatMul")])
    assert {op.get_friendly_name(): op.input_value(1).get_node().get_type_name()
            for op in weighted if op.get_type_name() == "MatMul"
            or op.input_value(1).get_node().get_type_name() == "Constant"} == \
        dict.fromkeys(heads, "Constant")
    assert {op.input_value(1).get_node().get_type_name() for op in weighted
            if op.get_friendly_name() not in heads} == {"Multiply"}
    assert "FakeQuantize" in (path / "model.int8.xml").read_text()
    with load(bundle, backend="openvino", precision="int8", threads=1) as engine:
        got = engine.infer(engine_slices)
    with load(bundle, backend="onnxruntime", threads=1) as engine:
        ref = engine.infer(engine_slices)
    # 0.79 measured on these random weights (ONNX Runtime's QDQ: > 0.9): tracks, not gated
    assert np.corrcoef(got[1].ravel(), ref[1].ravel())[0, 1] > 0.6
    (path / "model.int8.bin").write_bytes(b"\0" * 16)  # weights no longer match meta.json
    from ubc.errors import BundleError

    with pytest.raises(BundleError, match="model.int8.bin"):
        load(bundle, backend="openvino", precision="int8")


@pytest.mark.skipif(not HAS_NNCF, reason="nncf/openvino not installed (pip install nncf)")
def test_layer_groups_are_the_stem_the_encoder_stages_and_the_decoder_blocks(
        exported_bundle: Path) -> None:
    import openvino as ov

    from ubc.export.int8_openvino import fp32_ops, layer_groups

    model = ov.Core().read_model(str(Path(exported_bundle) / "model.onnx"))
    groups = layer_groups(model)
    # ResNet34: 3, 4, 6 and 3 basic blocks of two convolutions, a 1x1 downsampling one in
    # stages 2-4; the U-Net decoder: five blocks of two convolutions
    assert {name: len(ops) for name, ops in groups.items()} == {
        "stem": 1, "encoder stage 1": 6, "encoder stage 2": 9, "encoder stage 3": 13,
        "encoder stage 4": 7, **{f"decoder block {k}": 2 for k in range(1, 6)}}
    weighted = {op.get_friendly_name() for op in model.get_ops()
                if op.get_type_name() in ("Convolution", "MatMul")}
    grouped = [name for ops in groups.values() for name in ops]
    assert len(grouped) == len(set(grouped)) and set(grouped) == weighted - set(fp32_ops(model))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NNCF, reason="nncf/openvino not installed (pip install nncf)")
def test_int8_groups_are_chosen_to_keep_the_gate_margin_on_held_back_slices(
        exported_bundle: Path, tmp_path: Path, engine_slices: np.ndarray,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """INT8 with a gate: the groups left in floating point are those whose quantisation
    cost the margin, the ops OpenVINO runs in floating point are theirs and the heads',
    and the recorded margin is what the openvino engine gives on the held-back slices;
    ONNX Runtime's INT8, exported after, keeps the same convolutions in fp32."""
    import openvino as ov

    from ubc.export import exporter
    from ubc.export.int8_openvino import (
        MIN_MARGIN,
        _split,
        float_ops_precision,
        fp32_ops,
        layer_groups,
    )
    from ubc.parity import margin_at

    gate = margin_at("int8")
    fit, held_back = _split(engine_slices)
    assert (len(fit), len(held_back)) == (32, 32)
    bundle = Bundle(copy_bundle(exported_bundle, tmp_path))
    exporter("int8-openvino")(bundle, calib=engine_slices, gate=gate)
    entry = bundle.meta["artifacts"]["model.int8.xml"]
    choice = entry["layer_choice"]
    model = ov.Core().read_model(str(bundle.file("model.onnx")))
    groups = layer_groups(model)
    assert choice["validation_slices"] == 32 and entry["calibration_slices"] == 32
    # bf16 float ops where this CPU has them, the float model keeps the margin in bf16 and
    # the chosen IR is not slower so
    preferred = float_ops_precision()
    assert choice["float_model_margin"].keys() == {preferred}
    speeds = choice["float_ops_slices_per_s"]
    bf16_kept = preferred == "bf16" and choice["float_model_margin"]["bf16"] >= MIN_MARGIN
    assert speeds.keys() == ({"bf16", "f32"} if bf16_kept else set())
    if entry["float_ops"] == "bf16":
        assert bf16_kept
    elif bf16_kept:
        assert speeds["f32"] > speeds["bf16"]
    assert sorted(choice["int8_groups"] + choice["float_groups"]) == sorted(groups)
    assert entry["higher_precision_ops"] == sorted(
        [op for g in choice["float_groups"] for op in groups[g]]
        + [op.get_friendly_name() for op in model.get_ops()
           if op.get_friendly_name() in fp32_ops(model)
           and op.get_type_name() in ("Convolution", "MatMul")])
    trials = {tuple(t["int8_groups"]): t["margin"] for t in choice["trials"]}
    assert trials[tuple(choice["int8_groups"])] == choice["margin"]
    if choice["float_groups"]:  # every group in INT8 did not keep the margin
        assert trials[tuple(groups)] < MIN_MARGIN
        for group in choice["float_groups"]:
            assert any(m < MIN_MARGIN for k, m in trials.items() if group in k)
    assert choice["margin"] >= MIN_MARGIN or choice["int8_groups"] == list(groups)
    with load(bundle, backend="openvino", precision="fp32", threads=1) as engine:
        reference = engine.infer(held_back)
    with load(bundle, backend="openvino", precision="int8", threads=1) as engine:
        assert engine.config["INFERENCE_PRECISION_HINT"] == entry["float_ops"]  # type: ignore[attr-defined]
        assert gate(reference, engine.infer(held_back)) == \
            pytest.approx(choice["margin"], abs=1e-3)
    # ONNX Runtime's INT8 keeps the same groups in fp32 (and the heads), convolutions only
    import onnx

    exporter("int8-onnx")(bundle, calib=engine_slices)
    ort_entry = Bundle(bundle.path).meta["artifacts"]["model.int8.onnx"]
    assert (ort_entry["layer_choice"], ort_entry["float_groups"]) == \
        ("openvino's", choice["float_groups"])
    float_convs = {name.removesuffix("/WithoutBiases")
                   for g in choice["float_groups"] for name in groups[g]}
    assert set(choice["float_convolutions"]) == float_convs
    graph = onnx.load(str(bundle.file("model.int8.onnx"))).graph
    quantised = {node.name for node in graph.node if node.op_type == "Conv"
                 and any(i.endswith("_DequantizeLinear_Output") for i in node.input)}
    convs = {node.name for node in onnx.load(str(bundle.file("model.onnx"))).graph.node
             if node.op_type == "Conv"}
    assert quantised and not quantised & float_convs and len(quantised) == \
        len(convs) - len(float_convs) - 1  # the mask head's convolution stays fp32 too
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    assert "Add" not in {made_by.get(node.input[0]) for node in graph.node
                         if node.op_type == "QuantizeLinear"}  # residual sums stay float
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # a CPU without native bf16
    with load(bundle, backend="openvino", precision="int8", threads=1) as engine:
        assert engine.config["INFERENCE_PRECISION_HINT"] == "f32"  # type: ignore[attr-defined]


def test_gate_margin_is_one_at_the_reference_and_zero_at_the_nearest_tolerance() -> None:
    from ubc.parity import TOLERANCES, gate_margin, margin_at, measure

    rng = np.random.default_rng(0)
    cls = rng.normal(0, 2, (64, 2))
    mask = rng.normal(0, 3, (64, 1, 8, 8))
    assert margin_at("int8")((cls, mask), (cls, mask)) == 1.0
    tol = TOLERANCES["int8"]
    exact = {"max_rel_class_logits": 0.0, "max_abs_p_hgg": 0.0, "mask_dice": 1.0,
             "class_flip_share": 0.0}
    assert gate_margin({**exact, "max_abs_p_hgg": tol.p_hgg}, tol) == pytest.approx(0)
    assert gate_margin({**exact, "mask_dice": 0.99}, tol) == pytest.approx(0.5)
    assert gate_margin({**exact, "class_flip_share": 1 / 64}, tol) < 0  # one flip in 64
    assert gate_margin({**exact, "max_rel_class_logits": 0.1}, tol) == pytest.approx(0.8)
    shifted = (cls + np.array([0.0, 0.05]), mask)  # moves every P(HGG) a little
    figures = measure((cls, mask), shifted)
    assert 0 < figures["max_abs_p_hgg"] < tol.p_hgg
    assert gate_margin(figures, tol) == pytest.approx(1 - figures["max_abs_p_hgg"] / tol.p_hgg)
    assert gate_margin(exact, TOLERANCES["fp32"]) == 1.0
    assert gate_margin({**exact, "class_flip_share": 0.5}, TOLERANCES["fp32"]) < 0


@pytest.mark.slow
def test_export_cpu_on_a_trained_bundle_gates_times_and_auto_picks(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ubc-export --cpu`` on a briefly trained 64 px bundle: every CPU artifact written,
    parity (slices and cases) and timings recorded, auto picks among the passing ones."""
    from ubc.cli.export import main
    from ubc.devices import cpu_class
    from ubc.synth import write_archive
    from ubc.training import TrainConfig, train

    archive = write_archive(tmp_path / "archive", 8, seed=11, shape=(128, 128, 48))
    config = TrainConfig.preset("quick", epochs=3, batch_size=8, threads=1)
    bundle = train(archive, tmp_path / "trained.ubc", config, progress=False).bundle
    code = main([str(bundle.path), "--cpu", "--calib-slices", "32", "--timing-seconds",
                 "0.2"])
    out = capsys.readouterr().out
    assert code == 0, out
    meta = Bundle(bundle.path).meta
    assert "model.int8.onnx" in meta["files"] and "model.ts" in meta["files"]
    int8 = meta["parity"]["onnxruntime:cpu:int8:model.int8.onnx"]
    assert int8["extra"]["cases"][0]["cases"] == 6  # the held-out phantoms
    timed = meta["timing"][cpu_class()]
    assert "torch:fp32" in timed and "onnxruntime:fp32" in timed
    assert all(r["batch"] == 32 and r["slices_per_s"] > 0 for r in timed.values())
    fastest = max(timed, key=lambda k: timed[k]["slices_per_s"])
    with load(bundle.path, device="cpu") as engine:
        assert f"{engine.selection.variant}:{engine.precision}" == fastest
    assert "now picks" in out
    # --retime: the same artifacts timed again, interleaved, nothing re-exported or re-gated
    assert main([str(bundle.path), "--cpu", "--retime", "--timing-seconds", "0.2"]) == 0
    again = Bundle(bundle.path).meta
    assert again["files"] == meta["files"] and again["parity"] == meta["parity"]
    retimed = again["timing"][cpu_class()]
    assert retimed.keys() == timed.keys()
    assert all(len(r["rounds"]) == 3 and r["measured"] >= timed[k]["measured"]
               for k, r in retimed.items())


def test_time_engines_interleaves_rounds(exported_bundle: Path,
                                         engine_slices: np.ndarray) -> None:
    """Every engine runs once per round, in turn (a drifting host biases none of them)."""
    from itertools import groupby

    from ubc.parity_timing import TIMING_ROUNDS, time_engines

    calls: list[str] = []

    class Recorded:
        def __init__(self, name: str, engine: object) -> None:
            self.name, self.engine = name, engine

        def infer(self, batch: np.ndarray) -> object:
            calls.append(self.name)
            return self.engine.infer(batch)  # type: ignore[attr-defined]

    with load(exported_bundle, backend="onnxruntime", threads=1) as ort, \
            load(exported_bundle, backend="torch", device="cpu") as eager:
        rounds = time_engines({"ort": Recorded("ort", ort), "eager": Recorded("eager", eager)},
                              engine_slices[:3], 4, 0.3)
    assert [len(r) for r in rounds.values()] == [TIMING_ROUNDS, TIMING_ROUNDS]
    assert all(speed > 0 for r in rounds.values() for speed in r)
    assert [name for name, _ in groupby(calls)] == ["ort", "eager"] * (1 + TIMING_ROUNDS)
