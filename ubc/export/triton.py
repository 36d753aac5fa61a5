"""A Triton Inference Server model repository from a bundle, for teams that already run
Triton: the bundle's ONNX model (and each TensorRT plan it holds, as a model of its own)
with a ``config.pbtxt`` whose input/output names, types and shapes are read from the ONNX
graph, plus ``max_batch_size``, ``dynamic_batching`` and an ``instance_group``.

    REPO/NAME/config.pbtxt          platform onnxruntime_onnx, instance kind KIND_AUTO
    REPO/NAME/1/model.onnx
    REPO/NAME_<gpu>_<precision>/    one per TensorRT plan (platform tensorrt_plan, KIND_GPU;
                                    the plan runs only on the GPU and TensorRT it names)
    REPO/README.md                  how to call it, preprocessing done client-side

Triton serves the network only: each slice must be preprocessed (resampled to the bundle's
spacing, cropped/padded, normalised) by the client with ``ubc.preprocess`` and the per-case
verdict (top-k slices, P(HGG), lesion volume) computed with ``ubc.scoring.aggregate``,
exactly as ``ubc-serve`` does in-process (see the README written with the repository).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ubc.artifacts import ONNX, parse_plan_name
from ubc.bundle import Bundle

__all__ = ["TensorSpec", "onnx_signature", "config_pbtxt", "to_triton"]

#: ONNX TensorProto element type -> Triton data type
_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 6: "TYPE_INT32",
          7: "TYPE_INT64", 3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, Triton type and dims without the batch dim
    (-1 for a dynamic one)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def _spec(value: Any, path: Path) -> TensorSpec:
    tensor = value.type.tensor_type
    if tensor.elem_type not in _TYPES:
        raise ValueError(f"{path}: {value.name} has an ONNX element type ({tensor.elem_type}) "
                         "that Triton's config cannot name")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    if not dims or dims[0] != -1:
        raise ValueError(f"{path}: {value.name} has no dynamic batch dimension "
                         f"(shape {dims}); re-export the ONNX with ubc-export --onnx")
    return TensorSpec(value.name, _TYPES[tensor.elem_type], tuple(dims[1:]))


def onnx_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The (inputs, outputs) of an ONNX model, read from its graph (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_spec(v, path) for v in model.graph.input if v.name not in initializers]
    return inputs, [_spec(v, path) for v in model.graph.output]


def _tensors(kind: str, specs: list[TensorSpec]) -> list[str]:
    body = ",\n".join(f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n'
                      f'    dims: [ {", ".join(map(str, s.dims))} ]\n  }}' for s in specs)
    return [f"{kind} [", body, "]"]


def config_pbtxt(name: str, platform: str, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], *, max_batch: int, preferred: tuple[int, ...],
                 queue_delay_us: int, instances: int, kind: str) -> str:
    """The text of a Triton ``config.pbtxt`` (protobuf text format of ``ModelConfig``)."""
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}",
             *_tensors("input", inputs), *_tensors("output", outputs),
             "dynamic_batching {",
             f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
             f"  max_queue_delay_microseconds: {queue_delay_us}", "}",
             f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]"]
    return "\n".join(lines) + "\n"


def _model_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "ubc"


def _preferred(max_batch: int) -> tuple[int, ...]:
    sizes = {max_batch, max(1, max_batch // 2)}
    return tuple(sorted(sizes))


def _write_model(repo: Path, name: str, source: Path, filename: str, config: str) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    target = folder / "1" / filename
    target.unlink(missing_ok=True)
    try:  # bundles replace files atomically, so a hard link never sees a later change
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)
    (folder / "config.pbtxt").write_text(config)
    return folder


def to_triton(bundle: Bundle, repo: str | Path, *, name: str | None = None,
              max_batch: int = 32, queue_delay_us: int = 5000, instances: int = 1) -> list[Path]:
    """Write (or refresh) the Triton models of ``bundle`` under ``repo``; returns their
    folders. ``max_batch``: Triton's ``max_batch_size`` (a plan's own profile limit caps
    it); ``queue_delay_us``: how long Triton waits to fill a batch (the ``--max-wait-ms``
    of ubc-serve); ``instances``: model instances per device."""
    if max_batch < 1 or instances < 1 or queue_delay_us < 0:
        raise ValueError("max_batch and instances must be >= 1, queue_delay_us >= 0")
    repo = Path(repo)
    onnx_path = bundle.file(ONNX)  # sha256 checked: never package a changed file
    inputs, outputs = onnx_signature(onnx_path)
    base = _model_name(name or bundle.name)
    common: dict[str, Any] = dict(queue_delay_us=queue_delay_us, instances=instances)
    folders = [_write_model(repo, base, onnx_path, "model.onnx", config_pbtxt(
        base, "onnxruntime_onnx", inputs, outputs, max_batch=max_batch,
        preferred=_preferred(max_batch), kind="KIND_AUTO", **common))]
    for artifact in sorted(bundle.meta.get("files", {})):
        plan = parse_plan_name(artifact)
        if plan is None or not bundle.has(artifact):
            continue
        limit = int(bundle.meta.get("artifacts", {}).get(artifact, {}).get("max_batch",
                                                                              max_batch))
        batch = min(max_batch, limit)
        plan_model = _model_name(f"{base}_{plan['gpu']}_sm{plan['cc']}_{plan['precision']}")
        folders.append(_write_model(repo, plan_model, bundle.file(artifact), "model.plan",
                                    config_pbtxt(plan_model, "tensorrt_plan", inputs, outputs,
                                                 max_batch=batch, preferred=_preferred(batch),
                                                 kind="KIND_GPU", **common)))
    (repo / "README.md").write_text(_readme(bundle, base, inputs, outputs))
    return folders


def _readme(bundle: Bundle, name: str, inputs: list[TensorSpec],
            outputs: list[TensorSpec]) -> str:
    prep = bundle.preprocessing
    signature = "\n".join(f"- {kind} `{s.name}` {s.data_type} [batch, "
                          f"{', '.join(map(str, s.dims))}]"
                          for kind, group in (("input", inputs), ("output", outputs))
                          for s in group)
    return f"""# Triton model repository for the UBC bundle `{bundle.name}`

`tritonserver --model-repository $PWD` serves `{name}` (ONNX Runtime; one more model per
TensorRT plan, which runs only on the GPU and TensorRT version in its name).

{signature}

Triton runs the network only. Preprocess every axial slice client-side with the bundle's
settings ({prep.size[0]} x {prep.size[1]} pixels of {prep.target_spacing[0]} x
{prep.target_spacing[1]} mm, `{prep.norm}` normalisation) with `ubc.preprocess`, the same
code ubc-serve runs:

```python
from ubc import preprocess
from ubc.io import load_volume
volume = load_volume("case_flair.nii.gz")
counts = preprocess.foreground_counts(volume.data)
keep = counts.nonzero()[0]                       # background-only slices are not scored
batch = preprocess.slices(volume.data, volume.spacing, size={tuple(prep.size)},
                          target_spacing={tuple(prep.target_spacing)}, norm="{prep.norm}",
                          slice_indices=keep)     # float32 [S, 1, H, W] -> input `image`
```

then turn the outputs into the case's verdict with `ubc.scoring.aggregate`
(`p_hgg_of`, `lesion_pixels`, `decide`: top-k slices by predicted area,
P(HGG), lesion volume). Or run `ubc-serve`, which does all of it behind one POST.
"""
