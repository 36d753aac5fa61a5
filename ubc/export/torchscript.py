"""TorchScript export: traced, frozen, loadable with ``torch.jit.load`` alone.

Freezing inlines the weights as constants and folds batch norm into the convolutions. The
device-specific ``torch.jit.optimize_for_inference`` pass runs when an engine loads the file
(``ubc.engine.torch_backend``), not here: on the CPU it swaps in MKLDNN constants, and a
module holding them fails to load again ("required keyword attribute 'value' is undefined",
measured with torch 2.14), while the frozen graph stays portable between CPU and CUDA.
"""

from __future__ import annotations

import json
import time

import numpy as np

from ubc.artifacts import TORCHSCRIPT, TORCHSCRIPT_META, with_artifact
from ubc.bundle import EMBEDDED_SETTINGS, Bundle
from ubc.export.common import ExportResult, artifact_entry, check_arch, example_batch
from ubc.model import model_from_bundle
from ubc.quiet import TORCHSCRIPT_DEPRECATED, ignoring_warnings


@ignoring_warnings(TORCHSCRIPT_DEPRECATED, FutureWarning)
def to_torchscript(bundle: Bundle, *, example: np.ndarray | None = None) -> ExportResult:
    """Trace the bundle's model on ``example`` slices (float32 [B, 1, H, W]), freeze it and
    write ``model.ts`` atomically; meta.json records its sha256 and description. The
    file embeds the bundle's settings as the extra file ``ubc_meta.json``, which the
    engine compares with meta.json when it loads it."""
    import torch

    check_arch(bundle)
    start = time.perf_counter()
    model = model_from_bundle(bundle)
    x = torch.from_numpy(example_batch(bundle, example))
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
        # A traced graph silently keeps one branch of any data-dependent code: check it.
        got, want = frozen(x), model(x)
        for a, b in zip(got, want, strict=True):
            if not torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max())):
                raise RuntimeError(f"{bundle.path}: traced model disagrees with the eager one "
                                   f"(max |delta| {float((a - b).abs().max()):.3g})")
    settings = {"name": bundle.name, "arch": bundle.arch,
                **{key: bundle.meta[key] for key in EMBEDDED_SETTINGS}}
    extra = {TORCHSCRIPT_META: json.dumps(settings)}
    entry = artifact_entry(bundle, "torchscript", frozen=True)
    path = bundle.write_file(
        TORCHSCRIPT, lambda tmp: torch.jit.save(frozen, str(tmp), _extra_files=extra),
        artifacts=with_artifact(bundle.meta, TORCHSCRIPT, **entry))
    return ExportResult(TORCHSCRIPT, path, time.perf_counter() - start, entry)
