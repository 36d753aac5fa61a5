"""``run_bench``: every runnable backend x precision x batch size of a bundle, the eager
PyTorch fp32 baseline beside them, parity against it, preprocessing next to its peers and
the ``ubc-infer`` pipeline end to end; one ``BenchReport``."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ubc.benchmark.cell import CellSpec, run_cell, run_isolated
from ubc.benchmark.machine import (
    describe,
    last_level_cache_bytes,
    load_average,
    machine_facts,
    usable_cores,
)
from ubc.benchmark.plan import BenchOptions, Cell, plan
from ubc.benchmark.results import BenchReport, EngineRow, PipelineRow, PrepRow, Unavailable
from ubc.bundle import Bundle
from ubc.devices import ISA_CAP_ENV
from ubc.engine.registry import BASELINE

Progress = Callable[[str], None]
#: spread (IQR / median) above which a row is called noisy in the notes
NOISY_SPREAD = 0.2


def _quiet(message: str) -> None:
    """The default progress sink: say nothing."""


def _bundle_facts(bundle: Bundle) -> dict[str, Any]:
    p = bundle.preprocessing
    return {"path": str(bundle.path), "name": bundle.name, "arch": bundle.arch,
            "size": list(p.size), "target_spacing": list(p.target_spacing), "norm": p.norm,
            "weights_sha256": bundle.weights_sha256[:16],
            "trained": "training" in bundle.meta,
            "artifacts": sorted(bundle.meta["files"])}


def _inputs(bundle: Bundle, archive: Path, options: BenchOptions, folder: Path,
            progress: Progress) -> tuple[Path, str]:
    """Slices of the archive (timing buffers and parity) and, for parity, the eager fp32
    CPU outputs on them, saved for the cells; returns (the .npz, where slices came from)."""
    from ubc.check_data import slices_from

    n = options.parity_slices or 32
    slices, _ = slices_from([archive], bundle.preprocessing, n, seed=options.seed)
    slices = np.ascontiguousarray(slices, dtype=np.float32)
    cases = len(list(archive.glob("*/*/*_flair.nii.gz")))
    source = f"{len(slices)} slices of {cases} generated phantoms (ubc.synth, seed " \
             f"{options.seed}) through ubc.io + ubc.preprocess"
    arrays: dict[str, Any] = {"slices": slices}
    if options.parity_slices:
        progress(f"reference outputs: eager PyTorch fp32 on the CPU, {len(slices)} slices")
        arrays["class_logits"], arrays["mask_logits"] = _reference(bundle, slices,
                                                                   options.threads)
    path = folder / "inputs.npz"
    np.savez(path, **arrays)
    return path, source


def _reference(bundle: Bundle, slices: np.ndarray, threads: int | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``ubc.parity.reference_outputs`` with torch's thread count set to ``threads`` for
    the call (and put back)."""
    import torch

    from ubc.parity import reference_outputs

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return reference_outputs(bundle, slices)
    finally:
        torch.set_num_threads(before)


def _spec(cell: Cell, bundle: Bundle, options: BenchOptions, inputs: Path, *,
          parity: bool) -> CellSpec:
    return CellSpec(bundle=str(bundle.path), variant=cell.variant.name,
                    backend=cell.variant.backend, engine_options=cell.engine_options(options),
                    device=cell.device, precision=cell.precision,
                    batch_sizes=tuple(options.batch_sizes), warmup=options.warmup,
                    iters=options.iters, max_seconds=options.max_seconds, inputs=str(inputs),
                    cache_bytes=last_level_cache_bytes(),
                    parity=parity and options.parity_slices > 0,
                    reference=cell.is_reference, baseline=cell.is_baseline,
                    isolated=options.isolate, informational=cell.informational)


def _run_cells(cells: list[Cell], bundle: Bundle, options: BenchOptions, inputs: Path,
               folder: Path, progress: Progress) -> tuple[list[EngineRow], list[Unavailable]]:
    """Every cell, ``options.rounds`` times in turn (parity in the last round), merged."""
    each = dataclasses.replace(options, iters=-(-options.iters // options.rounds),
                               max_seconds=options.max_seconds / options.rounds)
    done: dict[int, list[list[EngineRow]]] = collections.defaultdict(list)
    failed: dict[int, Unavailable] = {}
    for turn in range(options.rounds):
        if options.rounds > 1:
            progress(f"round {turn + 1} of {options.rounds}")
        for i, cell in enumerate(cells):
            if i in failed:
                continue
            spec = _spec(cell, bundle, each, inputs, parity=turn == options.rounds - 1)
            try:
                done[i].append(run_isolated(spec, folder, progress) if options.isolate
                               else run_cell(spec, progress))
            except Exception as exc:  # one runtime failing must not lose the others' figures
                reason = str(exc) if isinstance(exc, RuntimeError) and options.isolate \
                    else f"{type(exc).__name__}: {exc}"
                failed[i] = Unavailable("engine", cell.variant.name, reason,
                                        device=cell.device, precision=cell.precision,
                                        failed=True, informational=cell.informational)
                progress(f"{cell.variant.name} {cell.precision}: FAILED: {reason}")
    rows = [EngineRow.merged([r[k] for r in done[i]]) if options.rounds > 1 else done[i][0][k]
            for i in sorted(done) if i not in failed for k in range(len(done[i][0]))]
    return rows, list(failed.values())


def with_speedups(rows: list[EngineRow]) -> list[EngineRow]:
    """Each row with its throughput over the baseline's at the same batch size."""
    base = {r.batch: r.throughput for r in rows if r.baseline}
    return [dataclasses.replace(r, speedup=r.throughput / base[r.batch])
            if r.batch in base else r for r in rows]


def auto_choice(bundle: Bundle, device: str) -> tuple[str | None, str | None]:
    """(variant, precision) ``ubc.engine.load(bundle, backend="auto")`` picks with its
    default precision, from what meta.json records; (None, None) when it picks nothing."""
    from ubc.engine.registry import choose

    try:
        choice = choose(bundle, device, "auto")
    except Exception:  # no backend can run: the rows and reasons say why
        return None, None
    return choice.variant or None, choice.precision


def _notes(rows: list[EngineRow], failed: list[Unavailable], bundle: Bundle,
           loads: list[list[float]], cores: int) -> list[str]:
    notes = []
    busiest = max((la[0] for la in loads if la), default=0.0)
    preempted = max((r.preemptions_per_call or 0.0 for r in rows), default=0.0)
    if busiest > 0.5 * cores:
        notes.append(f"the machine was busy (1-minute load average up to {busiest:.2f} on "
                     f"{cores} usable cores; up to {preempted:.0f} preemptions per call): "
                     "other processes competed for the CPU, so the figures are noisy and "
                     "multi-threaded runtimes suffer most; rerun on an idle machine to "
                     "compare runs")
    cap = os.environ.get(ISA_CAP_ENV)
    if cap:
        notes.append(f"instruction sets capped at {cap} ({ISA_CAP_ENV}): PyTorch and "
                     "OpenVINO honour the cap; ONNX Runtime's kernels do not, so its rows "
                     "are this CPU's full instruction set")
    if not any(r.baseline for r in rows):
        notes.append(f"the baseline ({BASELINE} fp32) did not run: no speed-ups are shown")
    if not bundle.meta.get("training"):
        notes.append("the bundle's weights are not trained (no training record in "
                     "meta.json): read parity as the relative class-logit error (rel)")
    noisy = sorted({f"{r.label} b{r.batch}" for r in rows
                    if r.latency.n > 1 and r.latency.spread > NOISY_SPREAD})
    if noisy:
        notes.append(f"spread (IQR/median) above {NOISY_SPREAD:.0%}: {', '.join(noisy)}")
    split = sorted({f"{r.label} b{r.batch} ({r.calls_per_batch} calls)" for r in rows
                    if r.calls_per_batch > 1})
    if split:
        notes.append(f"batches larger than the engine's max_batch ran split: {', '.join(split)}")
    from ubc.parity import GATED

    bad = {r.label: r.informational or (r.device.partition(":")[0], r.precision) in GATED
           for r in rows if r.parity is not None and not r.parity.passed}
    if any(not info for info in bad.values()):
        notes.append(f"PARITY FAILED: {', '.join(k for k, i in bad.items() if not i)} "
                     "(backend=\"auto\" could pick it; see the parity columns)")
    if any(bad.values()):
        # backend="auto" reads the gate the export recorded on its own slices, which these
        # are not: an INT8 IR calibrated on the training archive can fail here and pass there.
        notes.append(f"parity failed on this run's slices (informational, or a reduced CPU "
                     f"precision: backend=\"auto\" follows the gate its export recorded, "
                     f"meta.json 'parity'): {', '.join(k for k, i in bad.items() if i)}")
    notes += [f"{f.name} {f.precision} failed{' (informational)' if f.informational else ''}"
              f": {f.reason}" for f in failed]
    return notes


def _end_to_end(bundle: Bundle, device: str, options: BenchOptions, archive: Path,
                shape: tuple[int, int, int], progress: Progress
                ) -> tuple[list[PrepRow], list[Unavailable], PipelineRow | None]:
    from ubc.benchmark.pipeline import measure_pipeline
    from ubc.benchmark.preprocessing import measure_preprocessing

    prep: list[PrepRow] = []
    missing: list[Unavailable] = []
    if options.preprocessing:
        volume = Path(options.volume) if options.volume else \
            sorted(archive.glob("*/*/*_flair.nii.gz"))[0]
        prep, missing = measure_preprocessing(volume, bundle.preprocessing,
                                              iters=min(options.iters, 10),
                                              max_seconds=min(options.max_seconds, 10.0),
                                              progress=progress)
        if not options.peer:
            prep = [r for r in prep if "MONAI" not in r.name]
            missing = [m for m in missing if "MONAI" not in m.name]
    pipeline = None
    if options.pipeline_cases:
        progress(f"ubc-infer pipeline: {options.pipeline_cases} volumes of {shape}")
        try:
            pipeline = measure_pipeline(bundle, archive, shape,
                                        backend=options.pipeline_backend, device=device)
        except Exception as exc:  # reported, like a backend that fails
            missing.append(Unavailable("pipeline", "ubc-infer pipeline",
                                       f"{type(exc).__name__}: {exc}", failed=True))
    return prep, missing, pipeline


def run_bench(bundle: Bundle | str | os.PathLike[str], options: BenchOptions | None = None,
              *, command: str = "", progress: Progress | None = None) -> BenchReport:
    """Benchmark ``bundle`` (see ``BenchOptions``); ``progress`` receives one line per step."""
    from ubc.benchmark.preprocessing import volume_shape_for
    from ubc.devices import resolve_device
    from ubc.synth import write_archive

    options = options or BenchOptions()
    progress = progress or _quiet
    started = time.perf_counter()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    device = resolve_device(options.device)
    facts = machine_facts()
    progress(f"machine: {describe(facts)}")
    cells, unavailable = plan(bundle, device, options)
    shape = options.volume_shape or volume_shape_for(bundle.preprocessing)
    with tempfile.TemporaryDirectory(prefix="ubc-bench-") as tmp:
        folder = Path(tmp)
        progress(f"generating {max(options.pipeline_cases, 4)} phantom volumes of {shape}")
        archive = write_archive(folder / "archive", max(options.pipeline_cases, 4),
                                seed=options.seed, shape=shape)
        inputs, source = _inputs(bundle, archive, options, folder, progress)
        rows, failed = _run_cells(cells, bundle, options, inputs, folder, progress)
        if options.pipeline_cases:
            _keep_cases(archive, options.pipeline_cases)
        prep, missing, pipeline = _end_to_end(bundle, device, options, archive, shape,
                                              progress)
    rows = with_speedups(rows)
    loads = [facts["load_average"], *[list(r.load_average) for r in rows], load_average()]
    choice, precision = auto_choice(bundle, device)
    notes = _notes(rows, failed, bundle, loads, usable_cores())
    return BenchReport(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command, bundle=_bundle_facts(bundle),
        options={**_plain_options(options), "device": device, "parity_source": source},
        machine=facts, rows=tuple(rows), unavailable=tuple(unavailable + failed + missing),
        preprocessing=tuple(prep), pipeline=pipeline, notes=tuple(notes),
        seconds=round(time.perf_counter() - started, 1),
        load_average_end=tuple(load_average()), auto_choice=choice, auto_precision=precision)


def _keep_cases(archive: Path, cases: int) -> None:
    """Drop the volumes beyond the first ``cases`` (generated only for parity slices)."""
    import shutil

    folders = sorted(p.parent for p in archive.glob("*/*/*_flair.nii.gz"))
    for folder in folders[cases:]:
        shutil.rmtree(folder)


def _plain_options(options: BenchOptions) -> dict[str, Any]:
    entry = dataclasses.asdict(options)
    entry.pop("device")
    return entry
