"""INT8 ONNX: ONNX Runtime's post-training static quantiser on the bundle's ``model.onnx``.

QDQ format (QuantizeLinear/DequantizeLinear pairs around every convolution, which ONNX
Runtime's CPU provider fuses into integer kernels: VNNI/AMX dot products where the CPU has
them, AVX2 multiply-adds where it has not), unsigned int8 activations and signed int8
weights, weights per output channel, activation ranges calibrated on preprocessed slices
(the ``--calib`` data, as for TensorRT INT8); only the convolutions are quantised, and the
heads and the convolution groups that OpenVINO's INT8 export measured as costing the gates
stay fp32 (``fp32_nodes``). The result, ``model.int8.onnx``, carries the bundle's
metadata like ``model.onnx`` and is run by the onnxruntime backend at precision int8.

Unsigned activations because ONNX Runtime's x86 integer kernels multiply uint8 by int8:
with signed activations (as it was built before) its convolutions took a slower path and
INT8 was no faster than fp32 (21.0 against 22.3 slices/s at 224 px, batch 8, an AMX Xeon);
with unsigned ones 40.8, at the same accuracy on 64 slices (max |dP(HGG)| 0.054 against
0.056, mask Dice 0.997 against fp32).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ubc.artifacts import (
    INPUT_NAME,
    INT8_ONNX,
    INT8_OPENVINO,
    ONNX,
    artifacts_of,
    stale_reason,
    with_artifact,
)
from ubc.bundle import Bundle, artifact_metadata
from ubc.export.common import CalibrationBatches, ExportResult, artifact_entry, check_arch
from ubc.quiet import ignoring_log

#: Output channels of the encoder's last stage (ResNet34 layer4), whose features feed the
#: class head directly.
LAST_STAGE_CHANNELS = 512

#: MinMax: the activation ranges seen on the calibration slices. Percentile/Entropy clip
#: outliers but need a histogram pass per tensor (minutes at 224 px on 2 cores).
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def _reader(batches: CalibrationBatches) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._iter = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._iter, None)
            return None if batch is None else {INPUT_NAME: batch}

        def rewind(self) -> None:
            self._iter = iter(batches)

    return Reader()


def fp32_nodes(model: Any, float_convolutions: list[str] | None = None) -> list[str]:
    """Nodes left in fp32: those that write the outputs (mask and class heads), and the
    convolutions OpenVINO's INT8 export measured as costing the gates' margin
    (``float_convolutions``, ``openvino_layer_choice``). Without that measurement, a fixed
    guess: the convolution on the input and the encoder's last stage too. Measured on the
    trained demo bundle (128 held-out slices): quantising everything moved P(HGG) by up to
    0.036 and flipped 1.6 % of slices; with the guess, 0.026 and 0.8 % (the gates are 0.03
    and 1 %)."""
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    chosen = set(float_convolutions or ())
    keep = []
    for node in model.graph.node:
        is_conv = node.op_type == "Conv"
        guessed = float_convolutions is None and is_conv and (
            bool(inputs & set(node.input)) or (len(node.input) > 1 and weights.get(
                node.input[1], (0,))[0] == LAST_STAGE_CHANNELS))
        if outputs & set(node.output) or guessed or node.name in chosen:
            keep.append(node.name)
    return keep


def openvino_layer_choice(bundle: Bundle, model: Any) -> dict[str, Any] | None:
    """The layer choice of the bundle's OpenVINO INT8 export (``ubc.export.int8_openvino``:
    the convolution groups it kept in floating point because quantising them cost the
    gates' margin on held-back slices), when it was made from these weights and names this
    graph's nodes; None otherwise. Both quantisers give a convolution per-channel int8
    weights and activation ranges from the min/max of the same calibration slices, so a
    group's cost is the model's more than the runtime's; this artifact is gated on its own
    all the same."""
    choice = artifacts_of(bundle.meta).get(INT8_OPENVINO, {}).get("layer_choice")
    if not bundle.has(INT8_OPENVINO) or stale_reason(bundle, INT8_OPENVINO) or \
            not isinstance(choice, dict) or "float_convolutions" not in choice:
        return None
    names = {node.name for node in model.graph.node}
    return choice if set(choice["float_convolutions"]) <= names else None


def _embed_metadata(path: Path, bundle: Bundle) -> None:
    """The quantiser keeps the graph, not always the ``ubc.*`` metadata: write it again."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in {"ubc.arch": bundle.arch, "ubc.precision": "int8",
                       **artifact_metadata(bundle.meta)}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def to_int8_onnx(bundle: Bundle, *, calib: np.ndarray, batch: int = 8,
                 method: str = "minmax") -> ExportResult:
    """Quantise ``model.onnx`` to ``model.int8.onnx`` (atomic; sha256 and description in
    meta.json). ``calib``: preprocessed slices float32 [N, 1, H, W], N >= ``batch`` (a few
    hundred is plenty; ``ubc.data.sample_slices``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    check_arch(bundle)
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {', '.join(CALIBRATION_METHODS)}, "
                         f"got {method!r}")
    if not bundle.has(ONNX) or stale_reason(bundle, ONNX):
        raise ValueError(f"{bundle.path}: INT8 ONNX is quantised from an up-to-date "
                         f"model.onnx; export it first: `ubc-export {bundle.path} --onnx`")
    batches = CalibrationBatches(calib, batch, bundle.preprocessing.size)
    start = time.perf_counter()
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]

    import onnx

    model = onnx.load(str(bundle.file(ONNX)))
    choice = openvino_layer_choice(bundle, model)
    keep = fp32_nodes(model, None if choice is None else choice["float_convolutions"])

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="ubc-int8-") as work:
            out = Path(work) / "model.int8.onnx"
            # ONNX Runtime advises its own pre-processing (shape inference, fusions) to
            # whoever quantises a model: ours is exported by us, and the result is gated
            # by parity whatever it gives, so the user has nothing to act on.
            with ignoring_log("", "Please consider (to run )?pre-processing"):
                quantize_static(str(bundle.file(ONNX)), str(out), _reader(batches),
                                quant_format=QuantFormat.QDQ, per_channel=True,
                                nodes_to_exclude=keep,
                                # Residual adds, concats and upsampling stay float, as in
                                # OpenVINO's: no quantiser on a tensor both heads read (on
                                # the demo bundle, every group in INT8: margin -0.95 ->
                                # -0.78, and no slower)
                                op_types_to_quantize=["Conv"],
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=calibrate,
                                # Not CalibMaxIntermediateOutputs: onnxruntime 1.32 drops the
                                # collected ranges at that count instead of folding them in.
                                # Memory is small anyway: MinMax keeps per-tensor min/max only.
                                # The extremes over all batches, not CalibMovingAverage (their
                                # mean, as NNCF): on the trained 224 px bundle the mean did
                                # better on the 64 parity slices (max |dP| 0.006 against 0.031)
                                # and worse on whole volumes (0.23 against 0.012, and a held-out
                                # case changed class): edge slices outrun the averaged ranges.
                                extra_options={"CalibTensorRangeSymmetric": False})
            _embed_metadata(out, bundle)
            tmp.write_bytes(out.read_bytes())

    entry = artifact_entry(bundle, "onnx-int8", precision="int8", quantiser="onnxruntime",
                           quant_format="QDQ", per_channel=True, activations="uint8",
                           weights="int8", calibration=method, fp32_nodes=len(keep),
                           float_groups=None if choice is None else choice["float_groups"],
                           layer_choice="openvino's" if choice else "fixed guess",
                           calibration_batch=batch,
                           ranges="min/max of all batches",
                           calibration_slices=len(batches) * batch,
                           onnx_sha256=bundle.meta["files"][ONNX])
    path = bundle.write_file(INT8_ONNX, write,
                             artifacts=with_artifact(bundle.meta, INT8_ONNX, **entry))
    return ExportResult(INT8_ONNX, path, time.perf_counter() - start, entry)
