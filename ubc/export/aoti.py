"""AOTInductor export: ``torch.export`` with a dynamic batch axis, compiled ahead of time
by Inductor into a ``.pt2`` package for the CPU (C++ via the system compiler) or for the
CUDA GPU at hand, loadable with ``torch._inductor.aoti_load_package`` alone.

A package is machine code: the CPU one for this CPU's vector instruction set, the CUDA one
for this GPU's compute capability, both for this PyTorch release; the file name and
meta.json say which (``ubc.engine.aoti_backend`` refuses a package that does not fit).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ubc.artifacts import aoti_name, with_artifact
from ubc.bundle import Bundle, artifact_metadata
from ubc.devices import gpu_info, parse_device, resolve_device, strict_fp32
from ubc.export.common import ExportResult, artifact_entry, check_arch, example_batch
from ubc.model import model_from_bundle

DEFAULT_MAX_BATCH = 64


def to_aoti(bundle: Bundle, *, device: str = "cpu", max_batch: int = DEFAULT_MAX_BATCH,
            example: np.ndarray | None = None, freezing: bool = False) -> ExportResult:
    """Compile the bundle's model for ``device`` (cpu, cuda, cuda:N) with batches of
    1..``max_batch`` and store the package in the bundle atomically. ``freezing`` lets
    Inductor fold the weights into the graph (slower on our 2-core CPU, see the engines
    note). Compiling takes minutes on a small CPU."""
    import torch
    import torch._inductor

    from ubc.devices import cpu_isa

    check_arch(bundle)
    if max_batch < 2:
        raise ValueError(f"max_batch must be >= 2 (a dynamic axis of size 1 is specialised "
                         f"away by torch.export), got {max_batch}")
    device = resolve_device(device)
    kind, index = parse_device(device)
    start = time.perf_counter()
    if kind == "cuda":
        strict_fp32(torch)  # Inductor reads the TF32 switches when it generates kernels
    target = torch.device(kind, index) if kind == "cuda" else torch.device("cpu")
    model = model_from_bundle(bundle).to(target)
    x = torch.from_numpy(example_batch(bundle, example, batch=2)).to(target)
    if len(x) < 2:  # torch.export specialises a batch of 1 to a constant
        x = x.repeat(2, 1, 1, 1)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    gpu = gpu_info(index) if kind == "cuda" else None
    isa = cpu_isa() if kind == "cpu" else ""
    name = aoti_name(kind, isa=isa, gpu=gpu)

    def write(tmp: Path) -> None:
        # aoti_compile_and_package wants a path ending in .pt2; compile beside, then move.
        with tempfile.TemporaryDirectory(prefix="ubc-aoti-") as work:
            # the settings travel in the package; the engine compares them with meta.json
            configs = {"freezing": freezing,
                       "aot_inductor.metadata": artifact_metadata(bundle.meta)}
            package = torch._inductor.aoti_compile_and_package(
                program, package_path=str(Path(work) / "model.pt2"), inductor_configs=configs)
            shutil.move(package, tmp)

    entry = artifact_entry(bundle, "aoti", device=kind, isa=isa or None,
                           gpu=gpu.name if gpu else None,
                           compute_capability=f"{gpu.major}{gpu.minor}" if gpu else None,
                           max_batch=max_batch, freezing=freezing, precision="fp32")
    path = bundle.write_file(name, write, artifacts=with_artifact(bundle.meta, name, **entry))
    seconds = time.perf_counter() - start
    return ExportResult(name, path, seconds, {**entry, "compile_seconds": round(seconds, 1)})
