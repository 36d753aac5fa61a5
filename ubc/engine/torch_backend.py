"""PyTorch backend: the bundle's eager weights or its TorchScript, on the CPU or CUDA.

On CUDA: fp32, fp16 or bf16 (autocast, or weights cast to half with ``half_weights=True``,
eager only: a frozen TorchScript holds its weights as graph constants that cannot be cast),
channels_last, and optional CUDA-graph capture for fixed batch sizes (``cuda_graphs``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from ubc.artifacts import TORCHSCRIPT, TORCHSCRIPT_META, WEIGHTS
from ubc.bundle import Bundle
from ubc.devices import parse_device, strict_fp32
from ubc.engine.base import Engine
from ubc.errors import BundleError
from ubc.quiet import TORCHSCRIPT_DEPRECATED, ignoring_warnings

log = logging.getLogger(__name__)

ARTIFACTS = ("auto", "torchscript", "eager")


def _check_options(device: str, precision: str, artifact: str, half_weights: bool,
                   cuda_graphs: bool | Iterable[int]) -> None:
    if artifact not in ARTIFACTS:
        raise ValueError(f"artifact must be one of {ARTIFACTS}, got {artifact!r}")
    reason = TorchEngine.unsupported(device, precision)
    if reason is not None:
        raise ValueError(f"the torch backend: {reason}; fp16/bf16 are for device='cuda' "
                         "(slower than fp32 on the CPU here), INT8 needs TensorRT")
    if device.startswith("cpu") and cuda_graphs:
        raise ValueError("cuda_graphs needs device='cuda'")
    if half_weights and precision == "fp32":
        raise ValueError("half_weights needs precision='fp16' or 'bf16'")


def torchscript_settings(extra_file: str | bytes) -> dict[str, str]:
    """The ``ubc.*`` metadata of model.ts from its extra file ``ubc_meta.json`` (written by
    ``ubc.export.torchscript``); empty when it has none or it is not a JSON object."""
    try:
        settings = json.loads(extra_file or "{}")
    except ValueError:
        return {}
    if not isinstance(settings, dict):
        return {}
    return {f"ubc.{key}": json.dumps(value) for key, value in settings.items()}


def eager_model(bundle: Bundle) -> Any:
    """The eager model of the bundle's weights.pt; BundleError when the weights do not fit
    the architecture meta.json names (or their settings differ from meta.json's)."""
    from ubc.model import model_from_bundle

    try:
        return model_from_bundle(bundle)
    except (RuntimeError, ValueError) as exc:  # load_state_dict's keys and shapes, the arch
        detail = str(exc).strip().splitlines()[0][:300]
        raise BundleError(f"{bundle.path / WEIGHTS}: does not fit arch {bundle.arch!r} of "
                          f"meta.json ({detail}); restore meta.json") from exc


def optimizes_for_inference(autocast: bool) -> bool:
    """Whether a TorchScript model goes through ``torch.jit.optimize_for_inference``: not
    when it runs under autocast. On CUDA the pass fuses conv + relu into
    ``aten::cudnn_convolution_relu`` / ``cudnn_convolution_add_relu``, which autocast's fp16
    and bf16 lists do not cover: the convolutions would run in fp32 under an fp16 label."""
    return not autocast


class HostStaging:
    """Copies batches to ``device`` through one pinned host buffer of ``max_batch`` slices
    (page-locked memory: the copy is one DMA instead of a bounce through a staging page);
    on the CPU batches are wrapped, not copied. Shared by the torch and AOTInductor engines,
    so that their figures compare like with like."""

    def __init__(self, torch: Any, device: Any, max_batch: int, size: tuple[int, int]) -> None:
        self._torch = torch
        self._device = device
        self.pinned = (torch.empty((max_batch, 1, *size), dtype=torch.float32).pin_memory()
                       if device.type == "cuda" else None)

    def to_device(self, batch: np.ndarray) -> Any:
        """``batch`` (float32 [B <= max_batch, 1, H, W]) as a float32 tensor on the device.
        The copy is asynchronous: the caller's device-to-host copy of the outputs orders
        it before the buffer is written again."""
        with warnings.catch_warnings():  # a read-only batch (a view of Ray's object store):
            warnings.simplefilter("ignore", UserWarning)  # the models only read it
            x = self._torch.from_numpy(batch)
        if self.pinned is None:
            return x
        staged = self.pinned[:len(batch)]
        staged.copy_(x)
        return staged.to(self._device, non_blocking=True)

    def close(self) -> None:
        self.pinned = None


class TorchEngine(Engine):
    """Eager or TorchScript model; see the module docstring for the CUDA options.

    ``artifact``: "torchscript" (``model.ts``), "eager" (``weights.pt`` + the project's model
    code) or "auto" (TorchScript when the bundle has it). ``threads`` sets torch's intra-op
    thread count (process-wide). ``cuda_graphs``: True captures a graph for every batch size
    met, or give the sizes to capture (others run uncaptured).
    """

    backend = "torch"
    packages = ("torch",)
    install = "pip install ubc[train]"
    devices = ("cpu", "cuda")
    precisions = {"cpu": ("fp32",), "cuda": ("fp32", "fp16", "bf16")}
    artifact_kinds = ("torchscript", "eager")
    #: whether the TorchScript model went through optimize_for_inference (never under
    #: autocast; see ``optimizes_for_inference``)
    optimized: bool = False

    @classmethod
    def artifact_for(cls, bundle: Bundle, device: str, precision: str, *,
                     artifact: str = "auto", **options: Any) -> str:
        if artifact == "auto":
            return TORCHSCRIPT if bundle.has(TORCHSCRIPT) else WEIGHTS
        return TORCHSCRIPT if artifact == "torchscript" else WEIGHTS

    @classmethod
    def absent(cls, bundle: Bundle, name: str, device: str, precision: str) -> str:
        if name == WEIGHTS:
            return (f"{bundle.path} has no {WEIGHTS}, which eager PyTorch runs (meta.json "
                    "lists it: copy the whole bundle folder; ubc-train writes it)")
        return super().absent(bundle, name, device, precision)

    @classmethod
    def unfit(cls, bundle: Bundle, name: str, device: str, precision: str) -> str | None:
        if name == WEIGHTS and importlib.util.find_spec("segmentation_models_pytorch") is None:
            return "eager weights need segmentation-models-pytorch (pip install ubc[train])"
        return None

    def __init__(self, bundle: Bundle, *, device: str = "cpu", precision: str = "fp32",
                 max_batch: int = 32, artifact: str = "auto", half_weights: bool = False,
                 channels_last: bool | None = None, cuda_graphs: bool | Iterable[int] = False,
                 threads: int | None = None) -> None:
        import torch

        kind, index = parse_device(device)
        _check_options(device, precision, artifact, half_weights, cuda_graphs)
        if artifact == "auto":
            artifact = "torchscript" if bundle.has(TORCHSCRIPT) else "eager"
        if artifact == "torchscript" and half_weights:
            raise ValueError("half_weights needs artifact='eager' (TorchScript weights are "
                             "frozen constants); use autocast (the default) instead")
        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        if threads is not None:
            torch.set_num_threads(int(threads))
        if kind == "cuda" and precision == "fp32":
            strict_fp32(torch)
        if kind == "cpu":
            # Denormal floats are many times slower on x86 (as in ubc.training, which sets the
            # same); process-wide, and values under 1e-38 change no logit.
            torch.set_flush_denormal(True)
        self.artifact = TORCHSCRIPT if artifact == "torchscript" else WEIGHTS
        self._torch = torch
        self._device = torch.device(kind, index) if kind == "cuda" else torch.device("cpu")
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16,
                       "bf16": torch.bfloat16}[precision]
        self._autocast = precision != "fp32" and not half_weights
        self._input_dtype = self._dtype if half_weights else torch.float32
        self._channels_last = (kind == "cuda") if channels_last is None else channels_last
        self._model = self._load(bundle, artifact, half_weights)
        self._graph_sizes: set[int] | None = (
            None if cuda_graphs is True else {int(n) for n in cuda_graphs or ()})
        self._use_graphs = bool(cuda_graphs)
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        self._staging = HostStaging(torch, self._device, max_batch, self.input_size)

    @ignoring_warnings(TORCHSCRIPT_DEPRECATED, FutureWarning)
    def _load(self, bundle: Bundle, artifact: str, half_weights: bool) -> Any:
        torch = self._torch
        if artifact == "torchscript":
            extra = {TORCHSCRIPT_META: ""}
            model = torch.jit.load(str(bundle.file(TORCHSCRIPT)), map_location=self._device,
                                   _extra_files=extra)
            self.check_settings(torchscript_settings(extra[TORCHSCRIPT_META]))
            self.optimized = optimizes_for_inference(self._autocast)
            if self.optimized:
                try:
                    # Optimised here, not at export: on the CPU the pass swaps in MKLDNN
                    # constants, and a module holding them cannot be saved and loaded again.
                    model = torch.jit.optimize_for_inference(model)
                except RuntimeError as exc:  # pragma: no cover - depends on torch build
                    log.warning("optimize_for_inference failed (%s); running the frozen "
                                "graph", exc)
                    self.optimized = False
        else:
            model = eager_model(bundle)
            if half_weights:
                model = model.to(self._dtype)
        model = model.to(self._device)
        if self._channels_last and artifact == "eager":
            model = model.to(memory_format=torch.channels_last)
        return model

    def _forward(self, x: Any) -> tuple[Any, Any]:
        torch = self._torch
        with torch.autocast(self._device.type, dtype=self._dtype, enabled=self._autocast,
                            cache_enabled=False):
            class_logits, mask_logits = self._model(x)
        if mask_logits is None:
            raise ValueError(f"architecture {self.meta.get('arch')!r} has no mask head; the "
                             "engines serve 'ubc-resnet34' bundles")
        return class_logits, mask_logits

    def _to_device(self, batch: np.ndarray) -> Any:
        torch = self._torch
        x = self._staging.to_device(batch).to(self._input_dtype)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _graph(self, n: int) -> tuple[Any, Any, Any]:
        """A CUDA graph captured for batch size ``n``: (graph, static input, static output)."""
        if n in self._graphs:
            return self._graphs[n]
        torch = self._torch
        static_in = self._to_device(np.zeros((n, 1, *self.input_size), np.float32))
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as the capture requires
            for _ in range(3):
                self._forward(static_in)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._forward(static_in)
        self._graphs[n] = (graph, static_in, static_out)
        return self._graphs[n]

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        n = len(batch)
        with torch.inference_mode():
            if self._use_graphs and (self._graph_sizes is None or n in self._graph_sizes):
                graph, static_in, out = self._graph(n)
                static_in.copy_(self._to_device(batch))
                graph.replay()
            else:
                out = self._forward(self._to_device(batch))
            class_logits = out[0].float().cpu().numpy()
            mask_logits = out[1].float().contiguous().cpu().numpy()
        return class_logits, mask_logits

    def _release(self) -> None:
        self._graphs.clear()
        self._model = None
        self._staging.close()
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
