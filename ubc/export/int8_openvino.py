"""INT8 OpenVINO IR: NNCF's post-training quantisation of the bundle's ``model.onnx``, in
layer groups chosen by measurement so that the result keeps the INT8 gates.

NNCF (``pip install nncf``) reads the model through OpenVINO, inserts FakeQuantize nodes
at the inputs of the convolutions it quantises (OpenVINO's CPU plugin runs them on AMX,
VNNI or AVX2 integer kernels, chosen at compile time on the machine that runs it),
calibrates activation ranges on batches of preprocessed slices (the ``--calib`` data,
``CALIBRATION_BATCH`` at a time: the min/max over all of them) and corrects biases. The
two heads (``fp32_ops``) stay in floating point, and so do residual additions,
concatenations, upsampling and the class head's pooling: a quantiser there would sit on
a tensor that feeds both paths, and quantising the decoder alone moved P(HGG).

The convolutions come in groups (``layer_groups``): the stem, each encoder stage and each
decoder block. ``ubc-export --cpu`` hands in a gate (``ubc.parity.margin_at("int8")``):
every other calibration slice is then held back, and the groups are chosen on it
(``_choose_groups``): all of them when that keeps the margin (the plain INT8 model);
else each group is quantised alone, and the groups are added, least harmful first, while
the margin of the whole stays at least ``MIN_MARGIN``. The groups left in floating point,
every trial's margin and the ops left in floating point are in meta.json; the parity gates
(other slices, held-out cases) then judge the result as they judge every artifact.

Floating-point ops run in bf16 where the CPU computes it natively (``float_ops`` in
meta.json; the search measures the margin that way, and the openvino engine runs the IR
that way on such CPUs, in fp32 elsewhere), unless the model in bf16 alone already costs
the margin, or the chosen IR runs faster with fp32 float ops on the exporting CPU (timed
there, in meta.json): on a 224 px bundle with the decoder and the last two encoder stages in INT8,
77.0 slices/s against 41.5 with fp32 float ops (batch 8, an AMX Xeon).

The IR is two files, ``model.int8.xml`` (graph) and ``model.int8.bin`` (weights), each
with its sha256 in meta.json; the openvino backend runs them at precision int8.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

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
from ubc.devices import native_bf16
from ubc.export.common import CalibrationBatches, ExportResult, artifact_entry, check_arch

#: Slices per calibration sample. On the trained 224 px bundle (64 parity slices) one
#: slice per sample moved P(HGG) by up to 0.22 and flipped 3 % of slices; batches of 8,
#: 16 and 32: 0.013, 0.007 and 0.024 (ranges then the mean over samples).
CALIBRATION_BATCH = 16
VALIDATION_BATCH = 16
#: The chosen groups keep every parity figure within half its tolerance on the held-back
#: slices (``ubc.parity.gate_margin`` >= 0.5): room for the parity slices and held-out
#: cases the choice has not seen.
MIN_MARGIN = 0.5
_WEIGHTED = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")
#: Ops that stay in floating point, so that a quantiser sits at the input of the op that
#: computes in INT8 and on no tensor another path reads (see the module's docstring).
_FLOAT_TYPES = ["Add", "Concat", "Interpolate", "ReduceMean"]

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


def _ancestors(node: Any) -> set[str]:
    seen: set[str] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        for i in range(current.get_input_size()):
            parent = current.input_value(i).get_node()
            if parent.get_friendly_name() not in seen:
                seen.add(parent.get_friendly_name())
                stack.append(parent)
    return seen


def layer_groups(model: Any) -> dict[str, list[str]]:
    """The weighted ops of ``model`` but the heads, in groups that are quantised or kept in
    floating point together: ``stem`` (the first convolution), ``encoder stage k`` (the
    convolutions that feed the class head's pooling, by output channels) and ``decoder
    block k`` (the others, by output channels), in the order the graph computes them."""
    heads = set(fp32_ops(model))
    ordered = model.get_ordered_ops()
    pools = [op for op in ordered if op.get_type_name() == "ReduceMean"]
    encoder = _ancestors(pools[-1]) if pools else {op.get_friendly_name() for op in ordered}
    groups: dict[str, list[str]] = {}
    channels: dict[tuple[str, int], str] = {}
    for op in ordered:
        name = op.get_friendly_name()
        if op.get_type_name() not in _WEIGHTED or name in heads:
            continue
        part = "encoder stage" if name in encoder else "decoder block"
        if not groups:
            groups["stem"] = [name]
            continue
        key = (part, op.input_value(1).get_partial_shape()[0].get_length())
        if key not in channels:
            channels[key] = f"{part} {sum(k[0] == part for k in channels) + 1}"
        groups.setdefault(channels[key], []).append(name)
    return groups


def float_ops_precision() -> str:
    """The precision of the ops an INT8 IR leaves in floating point on this CPU: bf16 where
    it computes bf16 natively, else fp32 (OpenVINO's inference precision hint)."""
    return "bf16" if native_bf16() else "f32"


def to_int8_openvino(bundle: Bundle, *, calib: np.ndarray, gate: Gate | None = None
                     ) -> ExportResult:
    """Quantise ``model.onnx`` into ``model.int8.xml`` + ``model.int8.bin`` (each atomic,
    the weights first: a killed export leaves no graph without its weights). ``calib``:
    preprocessed slices float32 [N, 1, H, W], N >= ``CALIBRATION_BATCH``. ``gate``
    (``ubc.parity.margin_at("int8")``): choose the layer groups on a held-back share of
    ``calib`` so that the result keeps the gate; without it every group is quantised."""
    import nncf
    import openvino as ov

    check_arch(bundle)
    if not bundle.has(ONNX) or stale_reason(bundle, ONNX):
        raise ValueError(f"{bundle.path}: INT8 OpenVINO is quantised from an up-to-date "
                         f"model.onnx; export it first: `ubc-export {bundle.path} --onnx`")
    start = time.perf_counter()
    model = ov.Core().read_model(str(bundle.file(ONNX)))
    groups = layer_groups(model)
    size = bundle.preprocessing.size
    nncf.set_log_level(logging.WARNING)  # not a line per op it leaves in fp32
    if gate is None:
        batches = list(CalibrationBatches(calib, CALIBRATION_BATCH, size))
        quantised = _quantise(model, groups, list(groups), batches)
        hint, choice = float_ops_precision(), dict[str, Any]()
    else:
        fit, held_back = _split(calib)
        batches = list(CalibrationBatches(fit, CALIBRATION_BATCH, size))
        quantised, hint, choice = _choose_groups(model, groups, batches, held_back, gate)
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
                               ranges="min/max of all batches", float_ops=hint,
                               fp32_nodes=len(fp32_ops(model)),
                               higher_precision_ops=higher_precision_ops(quantised),
                               **choice,
                               weights_file=INT8_OPENVINO_WEIGHTS,
                               weights_file_sha256=bundle.meta["files"][INT8_OPENVINO_WEIGHTS],
                               onnx_sha256=bundle.meta["files"][ONNX])
        path = bundle.write_file(INT8_OPENVINO, lambda tmp: tmp.write_bytes(xml.read_bytes()),
                                 artifacts=with_artifact(bundle.meta, INT8_OPENVINO, **entry))
    return ExportResult(INT8_OPENVINO, path, time.perf_counter() - start, entry)


def higher_precision_ops(model: Any) -> list[str]:
    """The convolutions and matrix products of ``model`` that OpenVINO runs in floating
    point: their weights are a plain Constant (int8 weights are dequantised by a Multiply)."""
    return sorted(op.get_friendly_name() for op in model.get_ops()
                  if op.get_type_name() in _WEIGHTED
                  and op.input_value(1).get_node().get_type_name() == "Constant")


def _split(calib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slices to fit the ranges on, slices to validate on): alternate slices, so that both
    cover every case drawn. What moves P(HGG) most is a case unlike the others (on the
    224 px bundle, four slices of one phantom), and a held-back block of whole cases
    covered two of the eight."""
    if len(calib) < 2 * CALIBRATION_BATCH:
        raise ValueError(f"INT8 with a gate needs at least {2 * CALIBRATION_BATCH} "
                         f"calibration slices, got {len(calib)}; give more with --calib-slices")
    return calib[0::2], calib[1::2]


def _quantise(model: Any, groups: dict[str, list[str]], chosen: Sequence[str],
              batches: list[np.ndarray]) -> Any:
    """``model`` with the convolutions of the ``chosen`` groups in INT8."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    floating = [name for group, names in groups.items() if group not in chosen
                for name in names]
    return nncf.quantize(
        model, nncf.Dataset(batches), subset_size=len(batches),
        preset=nncf.QuantizationPreset.MIXED,
        ignored_scope=nncf.IgnoredScope(names=fp32_ops(model) + floating,
                                        types=_FLOAT_TYPES, validate=False),
        # The extremes over all batches, not NNCF's mean of each batch's min/max: on the
        # demo bundle (320 slices; the decoder and the last two encoder stages in INT8)
        # max |dP(HGG)| 0.0067 against 0.0159.
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))


def _outputs(compiled: Any, slices: np.ndarray) -> Outputs:
    parts = [compiled(batch) for batch in np.array_split(
        slices, max(1, len(slices) // VALIDATION_BATCH))]
    cls, mask = (np.concatenate([np.asarray(part[compiled.output(name)]) for part in parts])
                 for name in OUTPUT_NAMES)
    return cls, mask


def _compiled(core: Any, model: Any, hint: str) -> Any:
    """``model`` compiled for the CPU with its floating-point ops at ``hint``."""
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})


def _slices_per_s(core: Any, model: Any, batch: np.ndarray, hint: str, calls: int = 3
                  ) -> float:
    """Slices/s of ``model`` compiled with float ops at ``hint``: the fastest of ``calls``
    calls after one to warm up."""
    compiled = _compiled(core, model, hint)
    compiled(batch)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        compiled(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def _choose_groups(model: Any, groups: dict[str, list[str]], batches: list[np.ndarray],
                   held_back: np.ndarray, gate: Gate) -> tuple[Any, str, dict[str, Any]]:
    """(quantised model, the precision of its floating-point ops, the record of how its
    groups were chosen). The floating-point ops in bf16 where this CPU computes it natively
    and the model in bf16 keeps ``MIN_MARGIN`` on ``held_back``, else in fp32. Then every
    group when that keeps ``MIN_MARGIN``; else the groups that keep it alone, added least
    harmful first, each kept while the margin of the whole stays at least ``MIN_MARGIN``.
    When no group keeps it alone, every group: the gates then refuse the artifact. Last,
    fp32 float ops after all where the chosen model runs faster so and keeps the margin."""
    import openvino as ov

    core = ov.Core()

    def margin_of(candidate: Any, hint: str) -> float:
        return gate(reference, _outputs(_compiled(core, candidate, hint), held_back))

    reference = _outputs(_compiled(core, model, "f32"), held_back)
    preferred = float_ops_precision()
    # On the 224 px bundle trained 80 steps, bf16 alone cost 0.7 of the margin (mask Dice).
    float_margin = margin_of(model, preferred)
    hint = preferred if float_margin >= MIN_MARGIN else "f32"
    margins: dict[tuple[str, ...], float] = {}
    everything = tuple(groups)
    kept: dict[tuple[str, ...], Any] = {}  # the models that may be the answer
    progress = tqdm(total=2 * len(groups) + 1, desc="INT8 groups", unit="trial")

    def in_graph_order(chosen: Sequence[str]) -> tuple[str, ...]:
        return tuple(sorted(chosen, key=everything.index))

    def trial(chosen: Sequence[str]) -> float:
        key = in_graph_order(chosen)
        if key not in margins:
            quantised = _quantise(model, groups, key, batches)
            margins[key] = margin_of(quantised, hint)
            if margins[key] >= MIN_MARGIN or key == everything:
                kept[key] = quantised
            progress.update()
            progress.set_postfix_str(f"margin {margins[key]:.2f} with {len(key)} in INT8")
        return margins[key]

    chosen = list(everything)
    if trial(everything) < MIN_MARGIN:
        alone = {group: trial([group]) for group in groups}
        chosen = []
        for group in sorted((g for g in groups if alone[g] >= MIN_MARGIN),
                            key=lambda g: -alone[g]):
            if trial([*chosen, group]) >= MIN_MARGIN:
                chosen.append(group)
        chosen = chosen or list(everything)
    progress.close()
    key = in_graph_order(chosen)
    margin, speeds = margins[key], {}
    if hint == "bf16":
        # bf16 is not faster than fp32 on every CPU that has it (AVX512-BF16 without AMX:
        # 12.7 against 18.3 slices/s for the bf16 model at 224 px): the faster, if it keeps
        # the margin (fp32 float ops are the nearer to the reference).
        speeds = {h: _slices_per_s(core, kept[key], held_back[:VALIDATION_BATCH], h)
                  for h in ("bf16", "f32")}
        if speeds["f32"] > speeds["bf16"]:
            in_fp32 = margin_of(kept[key], "f32")
            if in_fp32 >= MIN_MARGIN:
                hint, margin = "f32", in_fp32
    return kept[key], hint, {"layer_choice": {
        "metric": "ubc.parity.gate_margin at int8 against the fp32 model",
        "min_margin": MIN_MARGIN, "margin": round(margin, 4),
        "float_model_margin": {preferred: round(float_margin, 4)},
        "float_ops_slices_per_s": {h: round(v, 1) for h, v in speeds.items()},
        "validation_slices": len(held_back),
        "int8_groups": list(key), "float_groups": [g for g in groups if g not in key],
        # OpenVINO names a convolution whose bias it splits off "<onnx node>/WithoutBiases"
        "float_convolutions": [name.removesuffix("/WithoutBiases") for g in groups
                               if g not in key for name in groups[g]],
        "trials": [{"int8_groups": list(k), "margin": round(m, 4)} for k, m in margins.items()]}}
