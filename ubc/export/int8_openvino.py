"""INT8 OpenVINO IR: NNCF's post-training quantisation of the bundle's ``model.onnx``, with
accuracy control against the INT8 gates.

NNCF (``pip install nncf``) reads the model through OpenVINO, inserts FakeQuantize nodes
where OpenVINO's CPU plugin has integer kernels (AMX, VNNI or AVX2, chosen by the plugin
at compile time on the machine that runs it), calibrates activation ranges on batches of
preprocessed slices (the ``--calib`` data, ``CALIBRATION_BATCH`` at a time) and corrects
biases. The two heads (the layers that write the outputs, ``fp32_ops``) stay fp32.

``ubc-export --cpu`` quantises with accuracy control (``quantize_with_accuracy_control``):
every other calibration slice is held back, and NNCF puts layers back into floating
point, those that cost the most first, until ``ubc.parity.gate_margin`` (every parity
figure against its INT8 tolerance) on the held-back slices is at least ``MIN_MARGIN``. The
layers left in floating point (``higher_precision_ops``) and the margin reached are in
meta.json; the parity gates (other slices, held-out cases) then judge the result as they
judge every artifact.

The IR is two files, ``model.int8.xml`` (graph) and ``model.int8.bin`` (weights), each
with its sha256 in meta.json; the openvino backend runs them at precision int8.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ubc.artifacts import (
    INT8_OPENVINO,
    INT8_OPENVINO_WEIGHTS,
    ONNX,
    OUTPUT_NAMES,
    Outputs,
    stale_reason,
    with_artifact,
)
from ubc.bundle import Bundle, artifact_metadata
from ubc.export.common import CalibrationBatches, ExportResult, artifact_entry, check_arch

#: Slices per calibration sample. NNCF's ranges are the mean over samples of each sample's
#: min/max, so one slice per sample gives ranges too narrow for the extremes of a batch:
#: on the trained 224 px bundle (64 parity slices) one slice per sample moved P(HGG) by
#: up to 0.22 and flipped 3 % of slices; batches of 8, 16 and 32: 0.013, 0.007 and 0.024.
CALIBRATION_BATCH = 16

VALIDATION_BATCH = 8
#: Ranking a layer costs a compile and a pass over this many validation batches.
RANKING_BATCHES = 4
#: Accuracy control keeps every parity figure within half its tolerance on the held-back
#: slices (``ubc.parity.gate_margin`` >= 0.5): room for the parity slices and held-out
#: cases it has not seen.
MIN_MARGIN = 0.5
#: At most this many layers go back to floating point (each costs a compile and a pass over
#: the held-back slices; ranking them costs one of each per quantised layer).
MAX_REVERTED = 24
_WEIGHTED = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")

#: (reference outputs, outputs) -> margin inside the gates (``ubc.parity.margin_at``)
Gate = Callable[[Outputs, Outputs], float]


def fp32_ops(model: Any) -> list[str]:
    """The ops that write the graph's outputs, up to and including the layer whose weights
    make them: the class head's MatMul and the mask head's Convolution with the bias Add
    (and scale) after them, which OpenVINO names after the output (``class_logits``,
    ``mask_logits``). Naming only that Add left both heads quantised."""
    names = []
    for result in model.get_results():
        node = result.input_value(0).get_node()
        while True:
            names.append(node.get_friendly_name())
            if node.get_type_name() in _WEIGHTED or node.get_input_size() == 0:
                break
            node = node.input_value(0).get_node()
    return names


def to_int8_openvino(bundle: Bundle, *, calib: np.ndarray, gate: Gate | None = None
                     ) -> ExportResult:
    """Quantise ``model.onnx`` into ``model.int8.xml`` + ``model.int8.bin`` (each atomic,
    the weights first: a killed export leaves no graph without its weights). ``calib``:
    preprocessed slices float32 [N, 1, H, W], N >= ``CALIBRATION_BATCH``. ``gate``
    (``ubc.parity.margin_at("int8")``): quantise with accuracy control on a held-back share
    of ``calib``, so the layers that cost the gates most stay in floating point."""
    import nncf
    import openvino as ov

    check_arch(bundle)
    if not bundle.has(ONNX) or stale_reason(bundle, ONNX):
        raise ValueError(f"{bundle.path}: INT8 OpenVINO is quantised from an up-to-date "
                         f"model.onnx; export it first: `ubc-export {bundle.path} --onnx`")
    start = time.perf_counter()
    model = ov.Core().read_model(str(bundle.file(ONNX)))
    keep = fp32_ops(model)
    settings = {"preset": nncf.QuantizationPreset.MIXED,
                "ignored_scope": nncf.IgnoredScope(names=keep)}
    size = bundle.preprocessing.size
    if gate is None:
        batches = list(CalibrationBatches(calib, CALIBRATION_BATCH, size))
        nncf.set_log_level(logging.WARNING)  # not a line per op it leaves in fp32
        quantised = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                                  **settings)
        control: dict[str, Any] = {}
    else:
        fit, held_back = _split(calib)
        batches = list(CalibrationBatches(fit, CALIBRATION_BATCH, size))
        quantised, control = _with_accuracy_control(model, batches, held_back, gate, settings)
    for key, value in {"ubc.arch": bundle.arch, **artifact_metadata(bundle.meta)}.items():
        quantised.set_rt_info(value, ["ubc", key.removeprefix("ubc.")])
    with tempfile.TemporaryDirectory(prefix="ubc-ov-int8-") as work:
        xml = Path(work) / INT8_OPENVINO
        ov.save_model(quantised, str(xml), compress_to_fp16=False)
        weights = xml.with_suffix(".bin")
        bundle.write_file(INT8_OPENVINO_WEIGHTS, lambda tmp: tmp.write_bytes(weights.read_bytes()))
        entry = artifact_entry(bundle, "openvino-int8", precision="int8", quantiser="nncf",
                               nncf=nncf.__version__, openvino=ov.get_version(),
                               preset="mixed", calibration_slices=len(batches) * CALIBRATION_BATCH,
                               calibration_batch=CALIBRATION_BATCH,
                               ranges="mean of batch min/max",
                               fp32_nodes=len(keep),
                               higher_precision_ops=higher_precision_ops(quantised),
                               **control,
                               weights_file=INT8_OPENVINO_WEIGHTS,
                               weights_file_sha256=bundle.meta["files"][INT8_OPENVINO_WEIGHTS],
                               onnx_sha256=bundle.meta["files"][ONNX])
        path = bundle.write_file(INT8_OPENVINO, lambda tmp: tmp.write_bytes(xml.read_bytes()),
                                 artifacts=with_artifact(bundle.meta, INT8_OPENVINO, **entry))
    return ExportResult(INT8_OPENVINO, path, time.perf_counter() - start, entry)


def higher_precision_ops(model: Any) -> list[str]:
    """The convolutions and matrix products of ``model`` that OpenVINO runs in floating
    point: their weights are a plain Constant (int8 weights are dequantised by a Multiply;
    an activation may be quantised further up, before a Concat or a MaxPool)."""
    return sorted(op.get_friendly_name() for op in model.get_ops()
                  if op.get_type_name() in _WEIGHTED
                  and op.input_value(1).get_node().get_type_name() == "Constant")


def _split(calib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slices to fit the ranges on, slices to validate on): alternate slices, so that both
    cover every case drawn. What moves P(HGG) most is a case unlike the others (on the
    224 px bundle, four slices of one phantom), and a held-back block of whole cases
    covered two of the eight."""
    if len(calib) < 2 * CALIBRATION_BATCH:
        raise ValueError(f"INT8 with accuracy control needs at least {2 * CALIBRATION_BATCH} "
                         f"calibration slices, got {len(calib)}; give more with --calib-slices")
    return calib[0::2], calib[1::2]


def _compiled(model: Any) -> Any:
    """``model`` compiled as NNCF compiles what it validates and as the openvino engine runs
    INT8: layers left in floating point in fp32 (OpenVINO's default is bf16 on AMX hosts)."""
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _outputs(compiled: Any, slices: np.ndarray) -> Outputs:
    result = compiled(slices)
    cls, mask = (np.asarray(result[compiled.output(name)]) for name in OUTPUT_NAMES)
    return cls, mask


def _with_accuracy_control(model: Any, batches: list[np.ndarray], held_back: np.ndarray,
                           gate: Gate, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """NNCF's quantisation with accuracy control: quantise every layer, then put back into
    floating point, one at a time, the layers whose quantisation moves ``gate``'s margin
    most (ranked on the held-back slices), until the margin against the fp32 model is at
    least ``MIN_MARGIN``, or ``MAX_REVERTED`` layers are back. (quantised model, what it
    did, for meta.json)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    reference = _compiled(model)
    items = [(x, *_outputs(reference, x))
             for x in CalibrationBatches(held_back, VALIDATION_BATCH, held_back.shape[2:])]

    def validate(compiled: Any, data: Any) -> tuple[float, None]:
        data = list(data)
        got = [_outputs(compiled, x) for x, _, _ in data]
        expected = tuple(np.concatenate([item[i] for item in data]) for i in (1, 2))
        return gate(expected, tuple(np.concatenate(g) for g in zip(*got, strict=True))), None  # type: ignore[arg-type]

    nncf.set_log_level(logging.INFO)  # its progress: the layers it puts back, the margin
    quantised = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(batches), nncf.Dataset(items, lambda item: item[0]), validate,
        max_drop=1 - MIN_MARGIN, drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(batches), **settings,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=MAX_REVERTED, ranking_subset_size=RANKING_BATCHES))
    nncf.set_log_level(logging.WARNING)
    margin = validate(_compiled(quantised), items)[0]
    return quantised, {"accuracy_control": {
        "metric": "ubc.parity.gate_margin at int8 against the fp32 model",
        "min_margin": MIN_MARGIN, "margin": round(margin, 4),
        "validation_slices": len(items) * VALIDATION_BATCH, "max_reverted": MAX_REVERTED}}
