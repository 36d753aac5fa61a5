"""ONNX export: opset 18, dynamic batch axis, input ``image``, outputs ``class_logits`` and
``mask_logits``; checked with ``onnx.checker``. The portable source of every TensorRT plan
and of the ONNX Runtime and OpenVINO engines."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ubc.artifacts import INPUT_NAME, ONNX, OUTPUT_NAMES, with_artifact
from ubc.bundle import Bundle, artifact_metadata
from ubc.export.common import ExportResult, artifact_entry, check_arch, example_batch
from ubc.model import model_from_bundle

OPSET = 18  # torch 2.14's dynamo exporter writes 18 natively (its torchlib opset)
MAX_DYNAMIC_BATCH = 4096


def _export(model: Any, x: Any, path: Path, opset: int) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    # dynamo=True is torch 2.14's default, said explicitly: the TorchScript-based exporter is
    # deprecated. One file, no external data: the model is ~100 MB, far below protobuf's 2 GB.
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset,
                      input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                      dynamic_shapes=({0: batch},), external_data=False, optimize=True,
                      verbose=False)


def _finish(path: Path, bundle: Bundle) -> None:
    """Validate, name the batch axis ``batch`` everywhere and embed the bundle's metadata."""
    import onnx

    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del model.metadata_props[:]
    for key, value in {"ubc.arch": bundle.arch, **artifact_metadata(bundle.meta)}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def to_onnx(bundle: Bundle, *, example: np.ndarray | None = None,
            opset: int = OPSET) -> ExportResult:
    """Export the bundle's model to ``model.onnx`` (atomic; sha256 and description recorded
    in meta.json). ``example``: preprocessed slices float32 [B, 1, H, W] to export with."""
    import torch

    check_arch(bundle)
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNorm-era ops, TensorRT 10), got {opset}")
    start = time.perf_counter()
    model = model_from_bundle(bundle)
    x = torch.from_numpy(example_batch(bundle, example))

    def write(tmp: Path) -> None:
        _export(model, x, tmp, opset)
        _finish(tmp, bundle)

    entry = artifact_entry(bundle, "onnx", opset=opset, exporter="dynamo",
                           input=INPUT_NAME, outputs=list(OUTPUT_NAMES), dynamic_batch=True)
    path = bundle.write_file(ONNX, write, artifacts=with_artifact(bundle.meta, ONNX, **entry))
    return ExportResult(ONNX, path, time.perf_counter() - start, entry)
