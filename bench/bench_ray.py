"""Ray's overhead and a cluster's sizing: the same archive scored by the single-process
pipeline (``score_archive``) and by local Ray (``score_archive_ray``) with the same engine,
then, from the per-stage costs measured here, how many CPU cores each GPU actor needs so the
accelerator never waits and how long 100,000 BraTS-size studies take on 8 GPUs.

    python -m bench.bench_ray                          # 12 volumes 240 x 240 x 155 -> 224 px
    python -m bench.bench_ray --cases 4 --shape 96 96 40 --size 64 --repeat 1   # a smoke run

Target: Ray's volumes/s >= 0.85 x the single process's, end to end: the single process
including its engine's load, Ray including its actor's start (which loads the engine), Ray
itself started before timing as a cluster would be. Both engines run with the same threads
(``--threads``, default every core); Ray gets this machine's CPUs (1 for the engine actor,
the rest for load tasks). The runs alternate ``--repeat`` times (the machine is shared: the
best of each and the run-by-run ratios are printed). GPU throughput is not measured here:
the sizing uses ``--gpu-slices-per-s`` figures, estimates until a GPU run replaces them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_pipeline import _archive, _bundle

STUDIES, GPUS = 100_000, 8


def _single(bundle: Path, archive: Path, args: argparse.Namespace, folder: Path) -> dict:
    from ubc.engine import load
    from ubc.scoring import ScoringOptions, score_archive

    started = time.perf_counter()
    engine = load(bundle, backend=args.backend, device="cpu", threads=args.threads)
    load_s = time.perf_counter() - started
    arrivals: list[float] = []
    try:
        out = Path(tempfile.mkdtemp(dir=folder)) / "results.csv"
        started = time.perf_counter()
        summary = score_archive(bundle, archive, out, engine=engine, options=ScoringOptions(
            batch_size=args.batch_size, workers=2), masks=out.parent / "masks" if args.masks
            else None,
            on_result=lambda _: arrivals.append(time.perf_counter() - started))
    finally:
        engine.close()
    return {"summary": summary, "engine_load_s": load_s, "out": out,
            "first_row_s": arrivals[0] + load_s}


def _actor_rss(stop: threading.Event, peak: list[int]) -> None:
    """Peak RSS of this Ray session's engine actors (processes under its raylet only)."""
    import psutil
    import ray

    raylet = ray._private.worker.global_worker.node.all_processes["raylet"][0].process.pid
    while not stop.wait(0.2):
        for child in psutil.Process(raylet).children(recursive=True):
            try:
                if "EngineActor" in " ".join(child.cmdline()):
                    peak[0] = max(peak[0], child.memory_info().rss)
            except psutil.Error:
                continue


def _ray(bundle: Path, archive: Path, args: argparse.Namespace, folder: Path) -> dict:
    from ubc.scoring import ScoringOptions
    from ubc.scoring.ray_runner import RayOptions, score_archive_ray

    arrivals: list[float] = []
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_actor_rss, args=(stop, peak), daemon=True)
    sampler.start()
    started = time.perf_counter()
    out = Path(tempfile.mkdtemp(dir=folder)) / "results.csv"
    try:
        summary = score_archive_ray(
            bundle, archive, out, backend=args.backend, device="cpu",
            masks=out.parent / "masks" if args.masks else None,
            options=ScoringOptions(batch_size=args.batch_size),
            ray_options=RayOptions(actors=(1, 1), engine_threads=args.threads),
            on_result=lambda _: arrivals.append(time.perf_counter() - started))
    finally:
        stop.set()
        sampler.join()
    return {"summary": summary, "first_row_s": arrivals[0],
            "actor_peak_rss_mb": peak[0] / 2 ** 20, "out": out}


def _same_rows(a: Path, b: Path) -> bool:
    from ubc.scoring import read_results

    def key(rows: list[Any]) -> list[tuple[Any, ...]]:
        return sorted((r.case_id, r.status, r.slices_used, round(r.p_hgg or 0, 5))
                      for r in rows)

    return key(read_results(a)) == key(read_results(b))


def _costs(summary: Any, cases: int) -> dict[str, float]:
    """Per-volume CPU seconds of each stage and per-slice engine seconds, from a Ray run
    (its "batch" stage is the actor's own work besides the engine, its "aggregate" stage the
    finish tasks: verdict, mask resampling and writing)."""
    stages, slices = summary.stage_seconds, max(summary.slices_scored, 1)
    return {"load_s": stages["load"] / cases, "preprocess_s": stages["preprocess"] / cases,
            "actor_s": stages["batch"] / cases,
            "finish_s": (stages["aggregate"] + stages["write"]) / cases,
            "engine_s_per_slice": stages["engine"] / slices,
            "slices_per_volume": slices / cases}


def sizing(costs: dict[str, float], gpu_rates: list[float], file_mb: float,
           cpu_engine_cores: int) -> list[dict]:
    """For each engine throughput (slices/s): the CPU cores one engine actor needs so it
    never waits (load, preprocess and finish tasks, plus the actor's own work besides the
    engine, which runs in its one Python thread: above 1 core the actor itself is the
    limit), and the hours for STUDIES on GPUS actors. The first row is the CPU engine
    measured here, whose own threads count as cores too."""
    rows = []
    cpu_rate = 1.0 / costs["engine_s_per_slice"]
    for label, rate in [("this CPU engine (measured)", cpu_rate)] + \
            [(f"GPU at {r:,.0f} slices/s (estimate)", r) for r in gpu_rates]:
        volumes_per_s = rate / costs["slices_per_volume"]
        actor = volumes_per_s * costs["actor_s"]
        if actor > 1.0:  # the actor's thread cannot keep up: it sets the pace
            volumes_per_s, actor = 1.0 / costs["actor_s"], 1.0
        feed = volumes_per_s * (costs["load_s"] + costs["preprocess_s"] + costs["finish_s"])
        engine_cores = cpu_engine_cores if rate == cpu_rate else 0
        rows.append({"engine": label, "slices_per_s": rate, "volumes_per_s": volumes_per_s,
                     "feed_cores": feed, "actor_cores": actor, "actor_bound": actor >= 1.0,
                     "cores_per_actor": int(np.ceil(feed + actor + 0.5)) + engine_cores,
                     "hours_8": STUDIES / (GPUS * volumes_per_s) / 3600,
                     "read_mb_s_8": GPUS * volumes_per_s * file_mb})
    return rows


def _markdown(rows: list[dict], title: str) -> str:
    lines = [f"**{title}**", "", "| engine per actor | slices/s | volumes/s per actor | CPU "
             "cores for load + preprocess + finish tasks | actor's own CPU | cores per actor "
             "(rounded up, +0.5 spare) | 100,000 studies on 8 actors | storage read for 8 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bound = " (actor-bound)" if r["actor_bound"] else ""
        lines.append(f"| {r['engine']} | {r['slices_per_s']:,.1f} | "
                     f"{r['volumes_per_s']:.2f}{bound} | {r['feed_cores']:.2f} | "
                     f"{r['actor_cores']:.2f} | {r['cores_per_actor']} | "
                     f"{r['hours_8']:,.2f} h | {r['read_mb_s_8']:,.0f} MB/s |")
    return "\n".join(lines)


def _best_costs(runs: list[Any], cases: int) -> dict[str, float]:
    """The lowest per-stage costs over the Ray runs (the least disturbed by the other
    processes on this shared machine)."""
    each = [_costs(r["summary"], cases) for r in runs]
    return {k: min(c[k] for c in each) if k != "slices_per_volume" else each[0][k]
            for k in each[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    bundle = _bundle(folder, args.size, args.spacing, export=args.backend != "torch")
    archive = _archive(folder, args.cases, tuple(args.shape))  # type: ignore[arg-type]
    load_before = os.getloadavg()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level=logging.ERROR)
    singles, rays = [], []
    try:
        for _ in range(args.repeat):  # alternated: slow drifts of the machine's load hit both
            singles.append(_single(bundle, archive, args, folder))
            rays.append(_ray(bundle, archive, args, folder))
    finally:
        ray.shutdown()
    e2e_single = [args.cases / (r["summary"].wall_seconds + r["engine_load_s"])
                  for r in singles]
    e2e_ray = [args.cases / r["summary"].wall_seconds for r in rays]
    costs = _best_costs(rays, args.cases)
    files = [p.stat().st_size for p in archive.rglob("*_flair.nii.gz")]
    file_mb = float(np.mean(files)) / 1e6
    rows = sizing(costs, args.gpu_slices_per_s, file_mb, args.threads or 1)
    quiet = dict(costs, load_s=args.reference_feed_ms / 1e3, preprocess_s=0.0)
    quiet_rows = sizing(quiet, args.gpu_slices_per_s, file_mb, args.threads or 1)
    bare_rows = sizing(dict(quiet, finish_s=0.0), args.gpu_slices_per_s, file_mb,
                       args.threads or 1)
    reference = f"load + preprocess {args.reference_feed_ms:g} ms/volume (bench/RESULTS.md, " \
        "quiet machine)"
    table = "\n\n".join([
        _markdown(rows, "every per-stage cost as measured in this run"
                  + (" (with masks)" if args.masks else "")),
        _markdown(quiet_rows, f"{reference}, the rest as measured"),
        _markdown(bare_rows, f"{reference}, no --masks (finish tasks about free), the rest as "
                  "measured")])
    return {
        "cases": args.cases, "shape": args.shape, "input": args.size, "spacing": args.spacing,
        "backend": singles[0]["summary"].backend, "threads": args.threads,
        "batch_size": singles[0]["summary"].batch_size, "masks": args.masks,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "single_end_to_end": e2e_single, "ray_end_to_end": e2e_ray,
        "single_first_row_s": [r["first_row_s"] for r in singles],
        "ray_first_row_s": [r["first_row_s"] for r in rays],
        "ratio_best": max(e2e_ray) / max(e2e_single),
        "paired_ratios": [r / s for r, s in zip(e2e_ray, e2e_single, strict=True)],
        "same_rows": all(_same_rows(a["out"], b["out"]) for a, b in zip(singles, rays,
                                                                        strict=True)),
        "actor_peak_rss_mb": max(r["actor_peak_rss_mb"] for r in rays), "costs": costs,
        "file_mb": file_mb, "sizing": rows, "sizing_quiet": quiet_rows,
        "sizing_no_masks": bare_rows, "table": table,
    }


def _print(x: dict[str, Any]) -> None:
    def figures(values: list[float]) -> str:
        return ", ".join(f"{v:.4f}" for v in values)

    print(f"{x['cases']} volumes of {x['shape']} -> {x['input']} px @ {x['spacing']} mm, "
          f"{x['backend']} {x['threads'] or 'all'} threads, batch {x['batch_size']}, masks "
          f"{'on' if x['masks'] else 'off'}; load average before {x['load_average_before']}, "
          f"after {x['load_average_after']} (shared machine)")
    print(f"single process volumes/s: {figures(x['single_end_to_end'])} (first row after "
          f"{figures(x['single_first_row_s'])} s, engine load included)")
    print(f"local Ray volumes/s     : {figures(x['ray_end_to_end'])} (first row after "
          f"{figures(x['ray_first_row_s'])} s, actor start included)")
    print(f"ratio (target 0.85)     : {x['ratio_best']:.3f} best/best, run by run "
          f"{figures(x['paired_ratios'])}; rows equal: {x['same_rows']}; engine actor peak "
          f"RSS {x['actor_peak_rss_mb']:.0f} MiB")
    c = x["costs"]
    print(f"per volume (best run)   : load {c['load_s'] * 1e3:.0f} ms, preprocess "
          f"{c['preprocess_s'] * 1e3:.0f} ms, actor's own {c['actor_s'] * 1e3:.0f} ms, finish "
          f"(verdict, mask) {c['finish_s'] * 1e3:.0f} ms, {c['slices_per_volume']:.0f} "
          f"slices, engine {c['engine_s_per_slice'] * 1e3:.1f} ms/slice; file "
          f"{x['file_mb']:.1f} MB")
    print(x["table"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--size", type=int, default=224, help="model input H = W (pixels)")
    parser.add_argument("--spacing", type=float, default=1.0, help="model pixel size (mm)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="engine intra-op threads, the same in both runs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="alternated runs of each")
    parser.add_argument("--masks", action=argparse.BooleanOptionalAction, default=True,
                        help="write masks (the actor's heaviest per-case work)")
    parser.add_argument("--reference-feed-ms", type=float, default=39.8,
                        help="load + preprocess ms/volume for the second table (default: "
                        "bench/RESULTS.md's, 240 x 240 x 155 to 224 x 224, quiet machine)")
    parser.add_argument("--gpu-slices-per-s", type=float, nargs="+",
                        default=[2000.0, 5000.0, 10000.0],
                        help="GPU engine throughputs to size for (estimates)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ubc-bench"))
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--markdown", help="write the sizing table to this file")
    args = parser.parse_args(argv)
    result = run(args)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(result["table"] + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
