"""INT8 OpenVINO IR: NNCF's post-training quantisation of the bundle's ``model.onnx``.

NNCF (``pip install nncf``) reads the model through OpenVINO, inserts FakeQuantize nodes
where OpenVINO's CPU plugin has integer kernels (AMX, VNNI or AVX2, chosen by the plugin
at compile time on the machine that runs it), calibrates activation ranges on batches of
preprocessed slices (the ``--calib`` data, ``CALIBRATION_BATCH`` at a time) and corrects
biases. Every convolution is quantised; only the ops that write the outputs stay fp32
(``fp32_ops``). Keeping ONNX Runtime's fp32 layers as well (the input convolution and the
encoder's last stage, ``int8_onnx.fp32_nodes``) was both slower and no more accurate here:
on the trained 224 px bundle (64 parity slices, AVX-512 VNNI, batch 32) 85-93 against
106-122 slices/s, max |dP(HGG)| 0.021 against 0.017, 1 slice of 64 changing class
against none; quantised throughout, no held-out case (22 phantoms, 2 real volumes) changed.
The IR is two files, ``model.int8.xml`` (graph) and ``model.int8.bin`` (weights), each
with its sha256 in meta.json; the openvino backend runs them at precision int8.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ubc.artifacts import (
    INT8_OPENVINO,
    INT8_OPENVINO_WEIGHTS,
    ONNX,
    onnx_metadata,
    stale_reason,
    with_artifact,
)
from ubc.bundle import Bundle
from ubc.export.common import CalibrationBatches, ExportResult, artifact_entry, check_arch

#: Slices per calibration sample. NNCF's ranges are the mean over samples of each sample's
#: min/max, so one slice per sample gives ranges too narrow for the extremes of a batch:
#: on the trained 224 px bundle (64 parity slices) one slice per sample moved P(HGG) by
#: up to 0.22 and flipped 3 % of slices; batches of 8, 16 and 32: 0.013, 0.007 and 0.024.
CALIBRATION_BATCH = 16


def fp32_ops(model: Any) -> list[str]:
    """The ops that write the graph's outputs: OpenVINO names each after its output
    (``class_logits``, ``mask_logits``), not after the ONNX node."""
    return [r.input_value(0).get_node().get_friendly_name() for r in model.get_results()]


def to_int8_openvino(bundle: Bundle, *, calib: np.ndarray) -> ExportResult:
    """Quantise ``model.onnx`` into ``model.int8.xml`` + ``model.int8.bin`` (each atomic,
    the weights first: a killed export leaves no graph without its weights). ``calib``:
    preprocessed slices float32 [N, 1, H, W], N >= ``CALIBRATION_BATCH``."""
    import nncf
    import openvino as ov

    check_arch(bundle)
    if not bundle.has(ONNX) or stale_reason(bundle, ONNX):
        raise ValueError(f"{bundle.path}: INT8 OpenVINO is quantised from an up-to-date "
                         f"model.onnx; export it first: `ubc-export {bundle.path} --onnx`")
    batches = list(CalibrationBatches(calib, CALIBRATION_BATCH, bundle.preprocessing.size))
    start = time.perf_counter()
    nncf.set_log_level(logging.WARNING)  # not a line per op it leaves in fp32
    model = ov.Core().read_model(str(bundle.file(ONNX)))
    keep = fp32_ops(model)
    quantised = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                              preset=nncf.QuantizationPreset.MIXED,
                              ignored_scope=nncf.IgnoredScope(names=keep))
    for key, value in {"ubc.arch": bundle.arch, **onnx_metadata(bundle.meta)}.items():
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
                               weights_file=INT8_OPENVINO_WEIGHTS,
                               weights_file_sha256=bundle.meta["files"][INT8_OPENVINO_WEIGHTS],
                               onnx_sha256=bundle.meta["files"][ONNX])
        path = bundle.write_file(INT8_OPENVINO, lambda tmp: tmp.write_bytes(xml.read_bytes()),
                                 artifacts=with_artifact(bundle.meta, INT8_OPENVINO, **entry))
    return ExportResult(INT8_OPENVINO, path, time.perf_counter() - start, entry)
