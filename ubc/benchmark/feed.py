"""``ubc-bench BUNDLE --feed``: how fast the CPU side of scoring feeds an engine. The whole
``ubc-infer`` path (``score_archive``) runs with a replay engine, which answers instantly
with the outputs the real model gave for the same slices, so that reading, preprocessing,
aggregation, masks, SEG and rows do their real work and the engine costs nothing.

Over a BraTS-geometry archive (240 x 240 x 155 int16 phantoms, plus ``../shared/data/real``
when present) written as .nii.gz, as single-frame DICOM series and as one Enhanced MR
instance per volume, with rows only, with masks, and (DICOM) with masks and SEG, on 1 and 2
cores (the process pinned to them); beside each, the floors on the same files and cores:
reading their bytes, and reading + inflating them with isal (the .nii.gz; DICOM has
nothing to inflate), measured in the same rounds as the row (``ROUNDS``). Then a
sequential breakdown of one core's milliseconds per volume by step. The replay engine is a
benchmark instrument: never reachable from ``ubc.engine.load``, never a stand-in for a real
engine in a test of the pipeline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ubc.bundle import Bundle
from ubc.engine.base import Engine

__all__ = ["ReplayEngine", "FeedOptions", "INPUTS", "run_feed", "print_feed", "plot_feed"]

INPUTS = ("nifti", "dicom", "dicom-multiframe")
#: the sequential breakdown's steps, in order (ms per volume on one core)
STEPS = ("discover", "read", "preprocess", "engine", "aggregate", "mask_grid", "mask_encode",
         "seg_encode", "row")
SHAPE = (240, 240, 155)
REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


def _key(row: np.ndarray) -> tuple[int, int, int]:
    """A slice's content key: two checksums of its bytes and its length (the replay is
    exact when the same input slice comes back, whatever batch it rides in)."""
    from isal import isal_zlib

    data = np.ascontiguousarray(row).data.cast("B")
    return (isal_zlib.crc32(data), isal_zlib.adler32(data), len(data))


class ReplayEngine(Engine):
    """Returns, per input slice, the class and mask logits ``source`` (a real engine) gave
    for a slice of the same content; a slice not seen yet is run through ``source`` once and
    remembered (``misses`` counts them, ``recording`` False refuses them)."""

    backend = "replay"
    artifact = "replay"

    def __init__(self, source: Engine) -> None:
        super().__init__(source.bundle, device="cpu", precision=source.precision,
                         max_batch=source.max_batch)
        self.source = source
        self.recording = True
        self.misses = 0
        self.cpu_s = 0.0  # this engine's thread CPU seconds, to take out of others' figures
        self._seen: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = time.thread_time()
        try:
            return self._replay(batch)
        finally:
            self.cpu_s += time.thread_time() - start

    def _replay(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = [_key(row) for row in batch]
        new = [i for i, k in enumerate(keys) if k not in self._seen]
        if new:
            if not self.recording:
                raise RuntimeError(f"replay: {len(new)} slices were never recorded")
            self.misses += len(new)
            logits, masks = self.source.infer(np.ascontiguousarray(batch[new]))
            for j, i in enumerate(new):
                self._seen[keys[i]] = (logits[j].copy(), masks[j].copy())
        outputs = [self._seen[k] for k in keys]
        return np.stack([o[0] for o in outputs]), np.stack([o[1] for o in outputs])


@dataclass(frozen=True)
class FeedOptions:
    """What ``run_feed`` measures: ``cases`` phantoms per input kind (plus the real volumes
    found), these ``inputs`` and core counts, the engine recorded (``backend``, on the CPU),
    and where the archives are kept between runs (``workdir``)."""

    cases: int = 8
    inputs: tuple[str, ...] = INPUTS
    threads: tuple[int, ...] = (1, 2)
    backend: str = "auto"
    workdir: Path = Path(tempfile.gettempdir()) / "ubc-bench-feed"
    real: Path | None = REAL_DATA


# --- the archives -------------------------------------------------------------------------
def _volumes(options: FeedOptions) -> list[tuple[str, Any]]:
    """(name, canonical Volume) of the phantoms and of the real FLAIR volumes found."""
    from ubc.io import load_volume
    from ubc.scoring import discover_cases
    from ubc.synth import write_archive

    nifti = options.workdir / f"phantoms-{options.cases}"
    if not (nifti / "labels.csv").is_file():
        write_archive(nifti, options.cases, seed=2024, shape=SHAPE)
    found = [(c.case_id, c.image) for c in discover_cases(nifti)]
    if options.real is not None and options.real.is_dir():
        found += [(p.name.split(".")[0], p) for p in sorted(options.real.glob("*.nii.gz"))
                  if "_seg" not in p.name]
    return [(name, load_volume(path)) for name, path in found]


def make_archives(options: FeedOptions) -> dict[str, Path]:
    """``{input kind: archive folder}``, the same volumes in every kind (written once)."""
    import nibabel as nib

    root = options.workdir / f"feed-{options.cases}"
    done = root / "done"
    archives = {kind: root / kind for kind in INPUTS}
    if done.is_file():
        return archives
    shutil.rmtree(root, ignore_errors=True)
    from pydicom.uid import generate_uid

    from ubc.io.dicom_write import SeriesSpec, write_series

    for i, (name, volume) in enumerate(_volumes(options)):
        data = np.asarray(volume.data).astype(np.int16)
        image = nib.Nifti1Image(data, volume.affine)
        image.header.set_qform(volume.affine, code=1)
        image.header.set_sform(volume.affine, code=1)
        (root / "nifti").mkdir(parents=True, exist_ok=True)
        nib.save(image, root / "nifti" / f"{name}_flair.nii.gz")
        for kind, multiframe in (("dicom", False), ("dicom-multiframe", True)):
            def uid(what: str, kind: str = kind, i: int = i) -> str:
                return str(generate_uid(entropy_srcs=["ubc-feed", kind, str(i), what]))

            write_series(data, volume.affine, root / kind / name,
                         SeriesSpec(uid("study"), uid("series"), uid("frame"),
                                    patient_id=name), multiframe=multiframe)
    done.write_text("ok\n")
    return archives


# --- pinning and floors --------------------------------------------------------------------
@contextmanager
def cores(n: int) -> Iterator[None]:
    """Run the block on ``n`` of this process's cores (every thread, native ones too)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(before)[:n])
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _files(archive: Path) -> list[list[Path]]:
    """Each case's files (a case: a .nii.gz, or a study folder)."""
    if archive.name == "nifti":
        return [[p] for p in sorted(archive.glob("*.nii.gz"))]
    return [sorted(p for p in d.rglob("*") if p.is_file()) for d in sorted(archive.iterdir())]


def floor(archive: Path, threads: int, *, inflate: bool, rounds: int = 3) -> float:
    """Volumes/s of reading every case's bytes (and inflating its .gz with isal) on
    ``threads`` cores, the best of ``rounds``: what no reader can beat."""
    from isal import igzip

    cases = _files(archive)

    def one(files: list[Path]) -> int:
        total = 0
        for path in files:
            data = path.read_bytes()
            if inflate and path.suffix == ".gz":
                data = igzip.decompress(data)
            total += len(data)
        return total

    with cores(threads), ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, cases))  # page cache warm
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(one, cases))
            best = min(best, time.perf_counter() - start)
        return len(cases) / best


# --- the pipeline runs ------------------------------------------------------------------
OUTPUTS = {"rows": (), "masks": ("masks",), "dicom_seg": ("masks", "dicom_seg")}
#: rounds of each feed row, its floor measured in each round just before its pipeline run and
#: the best of each kept: the host's speed drifts between minutes (by up to 1.6x on the
#: machines we measured), so a floor measured once per input kind would not compare
ROUNDS = 3


def _score(engine: ReplayEngine, bundle: Bundle, archive: Path, outputs: tuple[str, ...],
           threads: int, out: Path) -> Any:
    from ubc.scoring import ScoringOptions, score_archive
    from ubc.scoring.outputs import OutputSpec

    shutil.rmtree(out, ignore_errors=True)
    spec = OutputSpec.of(out / "scores.csv",
                         masks=out / "masks" if "masks" in outputs else None,
                         dicom_seg=out / "seg" if "dicom_seg" in outputs else None)
    options = ScoringOptions(workers=threads, preprocess_threads=threads)
    start = time.perf_counter()
    summary = score_archive(bundle, archive, spec, engine=engine, options=options)
    return summary, time.perf_counter() - start


def _measured_row(engine: ReplayEngine, bundle: Bundle, archive: Path, kind: str,
                  outputs: tuple[str, ...], threads: int, out: Path) -> dict[str, Any]:
    """One ``feed`` row: the fastest of ``ROUNDS`` pipeline runs, beside the fastest floor
    measured in the same rounds."""
    best: tuple[Any, float] | None = None
    floor_vps = 0.0
    for _ in range(ROUNDS):
        floor_vps = max(floor_vps, floor(archive, threads, inflate=kind == "nifti", rounds=1))
        with cores(threads):
            summary, wall = _score(engine, bundle, archive, outputs, threads, out)
        if best is None or wall < best[1]:
            best = (summary, wall)
    assert best is not None
    return _feed_row(kind, outputs, threads, *best, floor_vps)


def _feed_row(kind: str, outputs: tuple[str, ...], threads: int, summary: Any, wall: float,
              floor_vps: float) -> dict[str, Any]:
    """One ``feed`` row: volumes/s over the whole ``score_archive`` call (discovery and
    planning included: ``discover`` is that part's wall time per volume, the other stages
    the pipeline's busy time per volume)."""
    n = max(summary.scored, 1)
    stages = {"discover": round(1000 * (wall - summary.wall_seconds) / n, 2)}
    stages.update({k: round(1000 * v / n, 2) for k, v in summary.stage_seconds.items()})
    return {"input": kind, "outputs": ["rows", *outputs], "threads": threads,
            "cases": summary.scored, "failed": summary.failed,
            "volumes_per_s": round(summary.scored / wall, 3),
            "floor_volumes_per_s": round(floor_vps, 3), "stages_ms": stages}


# --- the sequential breakdown ----------------------------------------------------------
def breakdown(engine: ReplayEngine, bundle: Bundle, archive: Path, out: Path) -> dict[str, float]:
    """Milliseconds per volume of each step (``STEPS``) on one core, one case after the
    other, with masks (and SEG for DICOM) written: where a core's time goes."""
    from ubc.io import save_mask
    from ubc.scoring import discover_cases
    from ubc.scoring.outputs import OutputSpec
    from ubc.scoring.packer import batch_size_for
    from ubc.scoring.stages import (
        CaseOutputs,
        RunContext,
        finish_case,
        load_case,
        original_grid_mask,
        prepare_case,
        source_headers,
    )
    from ubc.scoring.writers import open_results

    shutil.rmtree(out, ignore_errors=True)
    spec = OutputSpec.of(out / "scores.csv", masks=out / "masks", dicom_seg=out / "seg")
    spec.create()
    context = RunContext.create(bundle, engine.backend, engine.precision)
    times = dict.fromkeys(STEPS, 0.0)

    @contextmanager
    def clock(step: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        times[step] += time.perf_counter() - start

    size = batch_size_for(engine.max_batch)
    results = open_results(out / "scores.csv")
    results.start()
    with cores(1):
        with clock("discover"):
            cases = discover_cases(archive)
        for case in cases:
            with clock("read"):
                loaded = load_case(case)
            with clock("preprocess"):
                prepared = prepare_case(loaded, context)
            slices = prepared.slices
            assert slices is not None, prepared.failure
            outputs = CaseOutputs.start(prepared, context, spec)
            for first in range(0, len(slices), size):
                part = np.ascontiguousarray(slices[first:first + size])
                with clock("engine"):
                    logits, masks = engine.infer(part)
                with clock("aggregate"):
                    outputs.add(first, logits, masks, part[:, 0])
            with clock("mask_grid"):
                mask = original_grid_mask(outputs)
            grid, files = outputs.record.grid, outputs.files
            assert grid is not None
            if files.mask is not None:
                with clock("mask_encode"):
                    save_mask(mask, grid, files.mask)
            if files.seg is not None and grid.source_frames is not None:
                from ubc.io.dicom_seg import write_seg

                with clock("seg_encode"):
                    write_seg(grid.to_original_orientation(mask), grid.source_frames,
                              files.seg, model=context.model, version="bench",
                              headers=source_headers(case))
            bare = CaseOutputs(outputs.record, context, OutputSpec().files_for(
                case.case_id, dicom=False), accumulator=outputs.accumulator)
            with clock("aggregate"):  # the verdict and the row (no file left to write)
                row = finish_case(bare).result
            with clock("row"):
                results.append(row)
    results.close()
    return {k: round(1000 * v / max(len(cases), 1), 2) for k, v in times.items()}


def _block_maker() -> Callable[[dict[str, np.ndarray]], object]:
    """What Ray Data does with an actor call's output in the actor's process: make it an
    Arrow block (nothing without Ray installed). Imported and run once here, outside the
    timings (its first call registers Arrow's extension types: about 0.3 s)."""
    try:
        from ray.data.block import BlockAccessor
    except ImportError:
        return lambda batch: None

    def as_block(batch: dict[str, np.ndarray]) -> object:
        with warnings.catch_warnings():  # Ray 2.60 warns about its own DataContext fields
            warnings.simplefilter("ignore", DeprecationWarning)
            return BlockAccessor.batch_to_block(batch)

    column = np.empty(1, dtype=object)
    column[0] = np.zeros((1, 2, 2), np.float16)
    as_block({"work": np.array([b""], dtype=object), "pixels": column})
    return as_block


def ray_stages(engine: ReplayEngine, bundle: Bundle, archive: Path, out: Path
               ) -> dict[str, float]:
    """CPU milliseconds per volume (this thread's, ``time.thread_time``) of ``ubc-infer
    --ray``'s three steps run one after the other in this process, with masks: the load
    task, the engine actor's own work besides the engine (its call, less the replay
    engine's CPU time, plus Ray Data's conversion of its output into a block), and the
    finish task. Ray itself is not started: its scheduling and object store are not in
    these figures."""
    from ubc.scoring import discover_cases
    from ubc.scoring.outputs import OutputSpec
    from ubc.scoring.ray_tasks import EngineActor, finish, load_and_prepare
    from ubc.scoring.stages import RunContext

    shutil.rmtree(out, ignore_errors=True)
    spec = OutputSpec.of(out / "scores.csv", masks=out / "masks")
    spec.create()
    cases = discover_cases(archive)
    context = RunContext.create(bundle, engine.backend, engine.precision)
    actor = EngineActor(str(bundle.path), engine.backend, "cpu", None, None, context, spec,
                        engine=engine)
    times = {"load_task": 0.0, "actor": 0.0, "finish_task": 0.0}
    as_block = _block_maker()
    with cores(1):
        for i in range(len(cases)):
            start = time.thread_time()
            loaded = load_and_prepare({"index": i}, cases=cases, context=context)
            times["load_task"] += time.thread_time() - start
            start, replayed = time.thread_time(), engine.cpu_s
            called = actor({"work": np.array([loaded["work"]], dtype=object),
                            "slices": loaded["slices"][None]})
            as_block(called)
            times["actor"] += time.thread_time() - start - (engine.cpu_s - replayed)
            start = time.thread_time()
            finish({name: column[0] for name, column in called.items()}, context=context)
            times["finish_task"] += time.thread_time() - start
    return {k: round(1000 * v / max(len(cases), 1), 2) for k, v in times.items()}


def run_feed(bundle: Bundle, options: FeedOptions,
             progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The ``--feed`` document: ``feed`` rows (see the module doc), the ``breakdown`` per
    input kind, and the machine."""
    from ubc.engine import load

    options.workdir.mkdir(parents=True, exist_ok=True)
    progress(f"writing the archives under {options.workdir} (once)")
    archives = make_archives(options)
    out = Path(tempfile.mkdtemp(prefix="feed-", dir=options.workdir))
    rows: list[dict[str, Any]] = []
    parts: dict[str, dict[str, float]] = {}
    ray: dict[str, dict[str, float]] = {}
    try:
        with load(bundle, backend=options.backend, device="cpu") as source:
            engine = ReplayEngine(source)
            for kind in options.inputs:  # record every slice with the real engine, untimed
                progress(f"recording the model's outputs on {kind}")
                _score(engine, bundle, archives[kind], (), max(options.threads), out)
            engine.recording = False
            for kind in options.inputs:
                wanted = [o for o in OUTPUTS if o != "dicom_seg" or kind != "nifti"]
                for name in wanted:
                    for n in options.threads:
                        progress(f"{kind} {name} on {n} core(s)")
                        rows.append(_measured_row(engine, bundle, archives[kind], kind,
                                                  OUTPUTS[name], n, out))
                progress(f"{kind}: sequential breakdown")
                parts[kind] = breakdown(engine, bundle, archives[kind], out / "breakdown")
                parts[kind]["read_floor"] = round(1000 / floor(archives[kind], 1,
                                                               inflate=False), 2)
                parts[kind]["inflate_floor"] = round(1000 / floor(archives[kind], 1,
                                                                  inflate=True), 2)
                progress(f"{kind}: ubc-infer --ray's tasks, one after the other")
                ray[kind] = ray_stages(engine, bundle, archives[kind], out / "ray")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    from ubc.benchmark.machine import machine_facts

    return {"feed": rows, "breakdown": parts, "ray": ray, "bundle": str(bundle.path),
            "input_size": list(bundle.preprocessing.size),
            "volume_shape": list(SHAPE), "machine": machine_facts(),
            "load": os.getloadavg()}


def print_feed(doc: dict[str, Any]) -> None:
    """The feed rows and the breakdown as two plain tables."""
    stages = list(doc["feed"][0]["stages_ms"]) if doc["feed"] else []
    print(f"ubc-bench --feed: {doc['bundle']} (input {'x'.join(map(str, doc['input_size']))})"
          f", load average {' '.join(f'{x:.2f}' for x in doc['load'])}")
    head = f"{'input':<17}{'outputs':<22}{'cores':>5}{'vol/s':>8}{'floor':>8}{'ratio':>7}"
    print(head + "".join(f"{s:>11}" for s in stages) + "   (stages: busy ms per volume)")
    for r in doc["feed"]:
        ratio = r["volumes_per_s"] / r["floor_volumes_per_s"] if r["floor_volumes_per_s"] else 0
        print(f"{r['input']:<17}{'+'.join(r['outputs']):<22}{r['threads']:>5}"
              f"{r['volumes_per_s']:>8.2f}{r['floor_volumes_per_s']:>8.1f}{ratio:>7.2f}"
              + "".join(f"{r['stages_ms'].get(s, 0):>11.1f}" for s in stages))
    print("\none core, one volume after the other, masks (+ SEG for DICOM) written: "
          "ms per volume")
    cols = [*STEPS, "read_floor", "inflate_floor"]
    print(f"{'input':<17}" + "".join(f"{c:>14}" for c in cols) + f"{'total':>10}")
    for kind, part in doc["breakdown"].items():
        total = sum(part[s] for s in STEPS)
        print(f"{kind:<17}" + "".join(f"{part.get(c, 0):>14.1f}" for c in cols)
              + f"{total:>10.1f}")
    if doc.get("ray"):
        print("\nubc-infer --ray's tasks in turn, masks written: CPU ms per volume "
              "(the engine actor's: its own work besides the engine)")
        print(f"{'input':<17}{'load task':>12}{'engine actor':>14}{'finish task':>13}")
        for kind, part in doc["ray"].items():
            print(f"{kind:<17}{part['load_task']:>12.1f}{part['actor']:>14.1f}"
                  f"{part['finish_task']:>13.1f}")


def plot_feed(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG: the breakdown's ms per volume by step, stacked, one bar per input kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(doc["breakdown"])
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.8 * len(kinds)))
    left = np.zeros(len(kinds))
    for step in STEPS:
        values = np.array([doc["breakdown"][k][step] for k in kinds])
        ax.barh(kinds, values, left=left, label=step)
        left += values
    ax.set_xlabel("ms per volume on one core (240x240x155, masks; SEG for DICOM)")
    ax.set_title("CPU side of scoring, by step (ubc-bench --feed)")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the bars
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
