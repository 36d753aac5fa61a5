"""What does the HTTP service cost, and what does batching buy? A bounded asyncio + httpx
load generator against a real ``ubc-serve`` on loopback, at several concurrencies, beside
the offline batch job (``score_archive``, what ``ubc-infer`` runs) on the same files and
backend, and ``Predictor.predict`` called directly.

    python bench/bench_serve.py                      # 64 x 64 @ 2 mm, onnxruntime, 8 files
    python bench/bench_serve.py --size 224 --spacing 1.0 --shape 240 240 155

Prints, and writes to ``--out`` (.md table, .json, .png): volumes/s, p50/p95/p99 latency, the
mean engine batch and the engine's busy share (from the server's own Prometheus metrics) per
concurrency; the ratio to the offline throughput (measured first and again last: on a shared
machine the busy share is the steadier figure); p50 at concurrency 1 against
``Predictor.predict``; the same load with ``--max-wait-ms 0``; and what an overloaded server
(small --max-queue) answers.
Targets (issue 11): concurrency 8 >= 0.85 x offline; p50 at concurrency 1 <= 1.2 x direct.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_pipeline import _archive, _bundle  # noqa: E402  (bench/ is not a package path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(bundle: Path, backend: str, *options: str) -> Iterator[str]:
    """A ``ubc-serve`` process on a free loopback port; yields its URL once ready."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "ubc.cli.serve", "--model", str(bundle),
                                "--port", str(port), "--backend", backend, "--log-level",
                                "warning", *options])
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("ubc-serve exited before it was ready")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise TimeoutError("ubc-serve was not ready in 180 s")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def _engine_counters(url: str) -> tuple[float, float, float]:
    """(slices, engine calls, engine busy seconds) so far, from the server's metrics."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    values = []
    for name in ("ubc_engine_batch_size_sum", "ubc_engine_batch_size_count",
                 "ubc_engine_busy_seconds_total"):
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        values.append(float(found.group(1)) if found else 0.0)
    return values[0], values[1], values[2]


async def _load(url: str, bodies: list[bytes], concurrency: int, requests: int) \
        -> dict[str, Any]:
    """``requests`` posts, at most ``concurrency`` in flight: latencies and statuses."""
    import httpx

    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    queue = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in queue:
            start = time.perf_counter()
            answer = await http.post(url + "/v1/predict", content=bodies[i % len(bodies)])
            statuses[answer.status_code] += 1
            if answer.status_code == 200:
                latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"wall": wall, "latencies": latencies, "statuses": dict(statuses)}


def _level(url: str, bodies: list[bytes], concurrency: int, requests: int) -> dict[str, Any]:
    before = _engine_counters(url)
    run = asyncio.run(_load(url, bodies, concurrency, requests))
    after = _engine_counters(url)
    calls = after[1] - before[1]
    lat = np.array(run["latencies"]) if run["latencies"] else np.array([np.nan])
    return {"concurrency": concurrency, "requests": requests, "statuses": run["statuses"],
            "volumes_per_s": len(run["latencies"]) / run["wall"],
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)),
            "mean_batch": (after[0] - before[0]) / calls if calls else 0.0,
            "engine_busy": (after[2] - before[2]) / run["wall"]}


def _offline(bundle: Path, archive: Path, backend: str, work: Path) -> tuple[float, float]:
    """(volumes/s, engine busy share) of the batch job on the archive (pipeline wall)."""
    from ubc.scoring import score_archive

    out = work / f"offline-{time.monotonic_ns()}.csv"
    summary = score_archive(bundle, archive, out, backend=backend, device="cpu")
    busy = summary.stage_seconds.get("engine", 0.0) / summary.wall_seconds
    return summary.scored / summary.wall_seconds, busy


def _direct(bundle: Path, bodies: list[bytes], backend: str, rounds: int) -> float:
    """p50 latency (s) of ``Predictor.predict`` on the same bytes, one caller."""
    from ubc.scoring import Predictor

    times = []
    with Predictor(bundle, backend=backend, device="cpu") as predictor:
        predictor.warm_up()
        for i in range(rounds * len(bodies)):
            start = time.perf_counter()
            predictor.predict(bodies[i % len(bodies)], mask=False)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _plot(levels: list[dict[str, Any]], nowait: list[dict[str, Any]], offline: float,
          path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [lv["concurrency"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
        left.plot(conc, [lv[key] * 1000 for lv in levels], style, label=key)
    left.set(xscale="log", xlabel="concurrency", ylabel="latency (ms)", title="latency")
    left.set_xticks(conc, [str(c) for c in conc])
    left.legend()
    right.plot(conc, [lv["volumes_per_s"] for lv in levels], "o-", label="ubc-serve")
    if nowait:
        right.plot([lv["concurrency"] for lv in nowait], [lv["volumes_per_s"] for lv in nowait],
                   "x", markersize=10, label="ubc-serve, max-wait-ms 0")
    right.axhline(offline, color="grey", linestyle="--", label="offline (score_archive)")
    right.set(xscale="log", xlabel="concurrency", ylabel="volumes / s", title="throughput")
    right.set_xticks(conc, [str(c) for c in conc])
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _table(levels: list[dict[str, Any]], offline: float) -> list[str]:
    rows = ["| concurrency | volumes/s | x offline | p50 ms | p95 ms | p99 ms | mean batch | "
            "engine busy | statuses |", "|---|---|---|---|---|---|---|---|---|"]
    for lv in levels:
        rows.append(f"| {lv['concurrency']} | {lv['volumes_per_s']:.2f} | "
                    f"{lv['volumes_per_s'] / offline:.2f} | {lv['p50'] * 1000:.0f} | "
                    f"{lv['p95'] * 1000:.0f} | {lv['p99'] * 1000:.0f} | "
                    f"{lv['mean_batch']:.1f} | {lv['engine_busy']:.0%} | {lv['statuses']} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 48))
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--concurrency", type=int, nargs="+", default=(1, 2, 4, 8, 16))
    p.add_argument("--requests", type=int, default=24, help="requests per level (at least "
                   "2 x the concurrency)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ubc-bench-serve")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    bundle = _bundle(args.work, args.size, args.spacing, export=args.backend != "torch")
    archive = _archive(args.work, args.cases, tuple(args.shape))
    from ubc.scoring import discover_cases

    bodies = [c.image.read_bytes() for c in discover_cases(archive)]
    load_before = os.getloadavg()
    offline, offline_busy = _offline(bundle, archive, args.backend, args.work)
    direct_p50 = _direct(bundle, bodies, args.backend, rounds=2)
    print(f"offline {offline:.2f} volumes/s (engine busy {offline_busy:.0%}); "
          f"Predictor.predict p50 {direct_p50 * 1000:.0f} ms", flush=True)
    n = lambda c: max(args.requests, 2 * c)  # noqa: E731
    with serving(bundle, args.backend) as url:
        levels = [_level(url, bodies, c, n(c)) for c in args.concurrency]
        for lv in levels:
            print(f"c={lv['concurrency']}: {lv['volumes_per_s']:.2f} vol/s, p50 "
                  f"{lv['p50'] * 1000:.0f} ms, mean batch {lv['mean_batch']:.1f}", flush=True)
    with serving(bundle, args.backend, "--max-wait-ms", "0") as url:
        nowait = [_level(url, bodies, c, n(c)) for c in (1, 8)]
    with serving(bundle, args.backend, "--max-queue", "96") as url:
        overload = _level(url, bodies, 32, 96)
    again, again_busy = _offline(bundle, archive, args.backend, args.work)  # drift check
    load_after = os.getloadavg()
    by_c = {lv["concurrency"]: lv for lv in levels}
    title = (f"ubc-serve, {args.size} px bundle, {args.backend}, {len(bodies)} phantoms "
             f"{'x'.join(map(str, args.shape))}")
    lines = [f"## {title}", "",
             f"machine: {os.cpu_count()} CPUs, shared; load average before "
             f"{load_before[0]:.1f}, after {load_after[0]:.1f}",
             f"command: python bench/bench_serve.py {' '.join(argv or sys.argv[1:])}", "",
             f"offline score_archive: {offline:.2f} volumes/s, engine busy {offline_busy:.0%}"
             f" (again at the end: {again:.2f} volumes/s, busy {again_busy:.0%}; the "
             "difference is the machine's drift)", "", *_table(levels, offline),
             "", "max-wait-ms 0 (no waiting to fill a batch):", "", *_table(nowait, offline),
             "", f"p50 at concurrency 1: {by_c.get(1, levels[0])['p50'] * 1000:.0f} ms over "
             f"HTTP vs {direct_p50 * 1000:.0f} ms Predictor.predict "
             f"({by_c.get(1, levels[0])['p50'] / direct_p50:.2f}x)",
             f"overload (--max-queue 96, 32 clients, 96 requests): statuses "
             f"{overload['statuses']}, {overload['volumes_per_s']:.2f} volumes/s answered, "
             f"p50 {overload['p50'] * 1000:.0f} ms, mean batch {overload['mean_batch']:.1f}"]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"offline": offline, "offline_busy": offline_busy, "offline_again": again,
         "direct_p50": direct_p50, "levels": levels, "nowait": nowait,
         "overload": overload, "load": [load_before, load_after]}, indent=2))
    _plot(levels, nowait, offline, args.out.with_suffix(".png"), title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
