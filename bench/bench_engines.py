"""Inference latency of every backend x batch size, for run-to-run comparison:

    pytest bench/bench_engines.py --benchmark-only                  # 224 x 224, batch 1, 8, 32
    pytest bench/bench_engines.py --benchmark-only --benchmark-save=cpu
    pytest bench/bench_engines.py --benchmark-only --benchmark-compare   # against the last save

The bundle is $UBC_BENCH_BUNDLE, else a cached random-weight 224 x 224 bundle (weights do not
change speed; see ubc.benchmark.bundles) under ~/.cache/ubc/bench. $UBC_BENCH_SIZE (e.g. 64)
picks a smaller cached bundle for a quick run, $UBC_BENCH_BATCHES the batch sizes,
$UBC_BENCH_DEVICE the device (default auto). One group per batch size: eager PyTorch fp32
first (the baseline of the ratios in the closing summary), then each backend; a backend
this machine cannot run is skipped with the reason. Inputs rotate among buffers larger than
the CPU cache (ubc.benchmark.timing), and each benchmark checks its output against eager
PyTorch fp32 with ubc.parity's fp32 tolerances. ``ubc-bench`` measures the same and more
(parity tables, memory, preprocessing, the pipeline) in one report.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from bench.conftest import record
from ubc.benchmark.bundles import calibrated_random_bundle
from ubc.benchmark.machine import last_level_cache_bytes
from ubc.benchmark.plan import BenchOptions, Cell, plan
from ubc.benchmark.timing import buffer_count, rotating_inputs
from ubc.bundle import Bundle, Preprocessing
from ubc.devices import resolve_device
from ubc.engine.registry import BASELINE, VARIANTS

SIZE = int(os.environ.get("UBC_BENCH_SIZE", "224"))
BATCHES = tuple(int(b) for b in os.environ.get("UBC_BENCH_BATCHES", "1,8,32").split(","))
ROUNDS = int(os.environ.get("UBC_BENCH_ROUNDS", "10"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ubc" / "bench"
#: the baseline first: the closing summary's ratios are against the first of each group
NAMES = [BASELINE, *(name for name in VARIANTS if name != BASELINE)]


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    if os.environ.get("UBC_BENCH_BUNDLE"):
        return Bundle(os.environ["UBC_BENCH_BUNDLE"])
    path = CACHE / f"random-{SIZE}.ubc"
    if (path / "meta.json").is_file():
        return Bundle(path)
    spacing = 224.0 / SIZE  # the same field of view at every size
    return calibrated_random_bundle(path, preprocessing=Preprocessing(
        size=(SIZE, SIZE), target_spacing=(spacing, spacing)))


@pytest.fixture(scope="module")
def device() -> str:
    return resolve_device(os.environ.get("UBC_BENCH_DEVICE", "auto"))


@pytest.fixture(scope="module")
def slices(bundle: Bundle) -> np.ndarray:
    """64 preprocessed phantom slices (half through the lesion), as ubc.parity makes them."""
    from ubc.check_data import phantom_slices

    return phantom_slices(bundle.preprocessing, 64, seed=0, cases=4)


@pytest.fixture(scope="module")
def reference(bundle: Bundle, slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from ubc.parity import reference_outputs

    return reference_outputs(bundle, slices)


@pytest.fixture(scope="module")
def engines(bundle: Bundle, device: str):
    """variant name -> a loaded fp32 engine, or the reason it cannot run here."""
    options = BenchOptions(batch_sizes=BATCHES, precisions=("fp32",))
    cells, unavailable = plan(bundle, device, options)
    loaded: dict[str, object] = {u.name: u.reason for u in unavailable}
    yield loaded, cells, options
    for engine in loaded.values():
        if hasattr(engine, "close"):
            engine.close()


def _engine(engines, name: str, bundle: Bundle):
    from ubc.engine import load

    loaded, cells, options = engines
    if name not in loaded:
        cell: Cell = next(c for c in cells if c.variant.name == name)
        loaded[name] = load(bundle, backend=cell.variant.backend, device=cell.device,
                            precision="fp32", **cell.engine_options(options))
    if isinstance(loaded[name], str):
        pytest.skip(f"{name}: {loaded[name]}")
    return loaded[name]


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("name", NAMES)
def test_engine(benchmark, figures, bundle, device, slices, reference, engines, name, batch):
    from ubc.parity import TOLERANCES, measure

    engine = _engine(engines, name, bundle)
    count = buffer_count(batch * slices[0].nbytes, ROUNDS + 2, last_level_cache_bytes())
    buffers = itertools.cycle(rotating_inputs(slices, batch, count))
    group = f"engines {SIZE}x{SIZE} {device} batch {batch}"
    benchmark.group = group
    benchmark.extra_info.update(batch=batch, device=device, artifact=engine.artifact)
    benchmark.pedantic(lambda: engine.infer(next(buffers)), rounds=ROUNDS, warmup_rounds=2,
                       iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["slices_per_second"] = batch / benchmark.stats.stats.median
    record(figures, group, f"{name} ({engine.artifact})", benchmark)
    n = max(batch, 16)
    agreement = measure((reference[0][:n], reference[1][:n]), engine.infer(slices[:n]))
    tol = TOLERANCES["fp32"]
    assert agreement["max_rel_class_logits"] <= tol.class_logits, agreement
    assert agreement["mask_dice"] >= tol.mask_dice, agreement
