"""AOTInductor backend: a ``torch.export`` program compiled ahead of time to native code
(``model.cpu-<isa>.pt2`` or ``model.cuda-sm90.pt2``), run without the project's model code.

A package holds machine code: a CPU one for the vector instruction set it was compiled
with (a newer x86 set runs older code, never the reverse: that would crash on an illegal
instruction), a CUDA one for one compute capability; both for one PyTorch version. A
package that does not fit this machine is refused with the command that rebuilds it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ubc.artifacts import aoti_name, artifacts_of, rebuild_hint
from ubc.bundle import Bundle
from ubc.devices import (
    cpu_isa,
    gpu_info,
    isa_compatible,
    isa_rank,
    parse_device,
    strict_fp32,
    torch_series,
)
from ubc.engine.base import Engine
from ubc.engine.torch_backend import HostStaging


def _find_cpu_package(bundle: Bundle) -> str | None:
    """The bundle's CPU package this CPU can run (the most capable one), if any."""
    here = cpu_isa()
    fitting = [(name, entry.get("isa", "")) for name, entry in artifacts_of(bundle.meta).items()
               if entry.get("format") == "aoti" and entry.get("device") == "cpu"
               and isa_compatible(str(entry.get("isa", "")), here)]
    fitting.sort(key=lambda item: isa_rank(item[1]), reverse=True)
    return fitting[0][0] if fitting else None


class AotiEngine(Engine):
    """An AOTInductor package on the CPU or a CUDA GPU (fp32; the batch range is the one it
    was exported with, recorded in meta.json)."""

    backend = "aoti"
    packages = ("torch",)
    install = "pip install ubc[train]"
    devices = ("cpu", "cuda")
    precisions = {"cpu": ("fp32",), "cuda": ("fp32",)}
    artifact_kinds = ("aoti",)

    @classmethod
    def artifact_for(cls, bundle: Bundle, device: str, precision: str, **options: Any) -> str:
        kind, index = parse_device(device)
        if kind == "cpu":
            return _find_cpu_package(bundle) or aoti_name("cpu", isa=cpu_isa())
        return aoti_name("cuda", gpu=gpu_info(index))

    @classmethod
    def unfit(cls, bundle: Bundle, name: str, device: str, precision: str) -> str | None:
        import torch

        built = str(artifacts_of(bundle.meta).get(name, {}).get("torch", "?"))
        if torch_series(built) != torch_series(torch.__version__):
            return f"{name} was compiled with PyTorch {built}, this is {torch.__version__}; " \
                   f"rebuild it: `{rebuild_hint(bundle.path, name)}`"
        return None

    def __init__(self, bundle: Bundle, *, device: str = "cpu", precision: str = "fp32",
                 max_batch: int | None = None, threads: int | None = None) -> None:
        reason = self.unavailable(bundle, device, precision)
        if reason is not None:
            raise ValueError(f"{bundle.path}: aoti backend: {reason}")
        import torch
        import torch._inductor

        name = self.artifact_for(bundle, device, precision)
        entry = artifacts_of(bundle.meta)[name]
        limit = int(entry.get("max_batch", 1))
        if max_batch is None:
            max_batch = limit
        if not 1 <= max_batch <= limit:
            raise ValueError(f"max_batch must be within 1..{limit}, the batch range {name} was "
                             f"exported with (re-export with a larger --max-batch)")
        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.artifact = name
        kind, index = parse_device(device)
        if kind == "cuda":
            strict_fp32(torch)  # the package calls cuDNN, which would use TF32 otherwise
        self._torch = torch
        self._device = torch.device(kind, index) if kind == "cuda" else torch.device("cpu")
        self._staging = HostStaging(torch, self._device, max_batch, self.input_size)
        self._runner: Any = torch._inductor.aoti_load_package(
            str(bundle.file(name)), device_index=index if kind == "cuda" else -1)
        self.check_settings(self._runner.get_metadata())  # ubc.export.aoti embeds them

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = self._staging.to_device(batch)  # pinned, as the torch engine's
            class_logits, mask_logits = self._runner(x)
            return class_logits.float().cpu().numpy(), mask_logits.float().cpu().numpy()

    def _release(self) -> None:
        self._runner = None
        self._staging.close()
