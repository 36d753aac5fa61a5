"""``ubc-serve`` under abuse (issue 26): 200 concurrent clients against a real server process
on a free loopback port, with a tiny bundle (32 x 32, torch on the CPU).

    python bench/abuse_serve.py                          # this checkout, prints a table
    python bench/abuse_serve.py --json after.json
    python bench/abuse_serve.py --checkout /tmp/before   # another checkout's ubc, e.g.
        # git worktree add /tmp/before HEAD~1 && cp ubc/_native*.so /tmp/before/ubc/

The mix, all started at once: valid phantoms (64 x 64 x 24 .nii.gz), truncated ones,
random bytes, empty bodies, gzip bombs (a small declared volume with 2 GiB of zeros behind
it; and 512^3 int16 declared, 2 MiB more inflated), volumes that declare 1024^3 uint8 in
1.1 MB (the issue's file), and slow clients trickling their body at a byte a second (they
give up after --slow-s). A thread probes /healthz every 50 ms throughout. Then one more slow
client, and SIGTERM: how long the server takes to exit.

Prints the answers by kind, valid-request p50/p99, the worst /healthz latency, the server's
peak RSS (psutil, sampled every 10 ms, and Linux's VmHWM reset before the run), the statuses
the server counted (/metrics), the ERROR lines it logged, the SIGTERM exit time, and the load
average (the machine may be shared: read timings beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hostile_uploads import declared_gz  # noqa: E402  (tests/ is not a package path)
from scoring_archive import make_tiny_bundle  # noqa: E402

MIX = {"valid": 107, "truncated": 20, "random": 20, "empty": 10, "bomb": 15,
       "bomb_at_cap": 5, "declared_huge": 3, "slow": 20}
MB = 1 << 20
# runs ubc.cli.serve from CHECKOUT instead of the installed (editable) package
_BOOT = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not "
         "in type(f).__module__.lower()]; sys.path.insert(0, {!r}); "
         "runpy.run_module('ubc.cli.serve', run_name='__main__')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bodies(volume: bytes, seed: int = 0) -> dict[str, list[bytes]]:
    """The bodies of each kind but ``slow``."""
    rng = random.Random(seed)
    bomb = declared_gz((64, 64, 64), "uint8", 2 << 30)
    at_cap = declared_gz((512, 512, 512), "int16", (256 + 2) * MB)
    huge = declared_gz((1024, 1024, 1024), "uint8")
    return {
        "valid": [volume] * MIX["valid"],
        "truncated": [volume[:rng.randrange(10, len(volume) - 10)]
                      for _ in range(MIX["truncated"])],
        "random": [rng.randbytes(rng.randrange(1024, 64 * 1024)) for _ in range(MIX["random"])],
        "empty": [b""] * MIX["empty"],
        "bomb": [bomb] * MIX["bomb"],
        "bomb_at_cap": [at_cap] * MIX["bomb_at_cap"],
        "declared_huge": [huge] * MIX["declared_huge"],
    }


@contextlib.contextmanager
def serving(bundle: Path, log: Path, checkout: Path | None
            ) -> Iterator[tuple[subprocess.Popen, int]]:
    """A ubc-serve process (of ``checkout`` when given) on a free loopback port, once
    ready, and its port."""
    port = _free_port()
    entry = ["-c", _BOOT.format(str(checkout))] if checkout else ["-m", "ubc.cli.serve"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, *entry, "--model", str(bundle), "--port", str(port),
             "--backend", "torch", "--device", "cpu", "--max-upload-mb", "20",
             "--max-queue", "4096"],  # every valid request's slices fit: none gets 503
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"ubc-serve exited: {log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"ubc-serve not ready: {log.read_text()}")
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class Watch:
    """The server's RSS (sampled) and /healthz latency (probed) while the load runs."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.proc, self.url = psutil.Process(process.pid), url
        self.rss_peak, self.healthz = 0, list[float]()
        self.healthz_failures = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample), threading.Thread(
            target=self._probe)]

    def __enter__(self) -> Watch:
        with contextlib.suppress(OSError):  # Linux: VmHWM restarts from the current RSS
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
            if hwm:
                self.rss_peak = max(self.rss_peak, int(hwm.group(1)) * 1024)

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.rss_peak = max(self.rss_peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def _probe(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(self.url + "/healthz").status_code == 200
                except httpx.TransportError:
                    ok = False
                self.healthz.append(time.perf_counter() - start)
                self.healthz_failures += not ok
                time.sleep(0.05)


async def _post(client: httpx.AsyncClient, url: str, body: bytes) -> tuple[str, float]:
    start = time.perf_counter()
    try:
        answer = await client.post(url + "/v1/predict", content=body)
        outcome = str(answer.status_code)
    except httpx.HTTPError as exc:
        outcome = f"error {type(exc).__name__}"
    return outcome, time.perf_counter() - start


async def _slow(port: int, give_up_s: float) -> tuple[str, float]:
    """A body sent at a byte a second: what the server did, and after how long ('held':
    nothing until the client gave up)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    outcome = "held"
    try:
        writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        while loop.time() - start < give_up_s:
            try:
                data = await asyncio.wait_for(reader.read(1024), 1.0)
            except asyncio.TimeoutError:
                writer.write(b"\0")
                await writer.drain()
                continue
            outcome = data.split(b" ", 2)[1].decode() if data else "closed"
            break
    except OSError as exc:
        outcome = f"error {type(exc).__name__}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return outcome, loop.time() - start


async def _load(url: str, port: int, bodies: dict[str, list[bytes]],
                slow_s: float) -> dict[str, list[tuple[str, float]]]:
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        jobs = {kind: [_post(client, url, b) for b in group] for kind, group in bodies.items()}
        jobs["slow"] = [_slow(port, slow_s) for _ in range(MIX["slow"])]
        kinds = [k for k, group in jobs.items() for _ in group]
        results = await asyncio.gather(*(j for group in jobs.values() for j in group))
    out: dict[str, list[tuple[str, float]]] = {}
    for kind, result in zip(kinds, results, strict=True):
        out.setdefault(kind, []).append(result)
    return out


def _sigterm_exit_s(process: subprocess.Popen, port: int, give_up_s: float) -> float:
    """Seconds from SIGTERM to exit with one client trickling its body."""
    def trickle() -> None:
        asyncio.run(_slow(port, give_up_s))

    client = threading.Thread(target=trickle)
    client.start()
    time.sleep(1.0)
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=give_up_s + 30)
    except subprocess.TimeoutExpired:
        process.kill()
    client.join()
    return time.monotonic() - start


def _server_statuses(text: str) -> dict[str, float]:
    found = re.findall(r'ubc_requests_total\{endpoint="predict",status="(\d+)"\} ([\d.e+]+)',
                       text)
    return {status: float(n) for status, n in found}


def run(checkout: Path | None, slow_s: float, server_log: Path | None) -> dict[str, Any]:
    from ubc.synth import write_archive

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ubc-abuse-") as tmp:
        work = Path(tmp)
        bundle = make_tiny_bundle(work / "tiny.ubc")
        root = write_archive(work / "archive", 1, seed=5, shape=(64, 64, 24))
        volume = next(root.rglob("*_flair.nii.gz")).read_bytes()
        bodies = _bodies(volume)
        log = server_log or work / "serve.log"
        with serving(bundle, log, checkout) as (process, port):
            url = f"http://127.0.0.1:{port}"
            assert httpx.post(url + "/v1/predict", content=volume, timeout=120
                              ).status_code == 200  # warm
            baseline = psutil.Process(process.pid).memory_info().rss
            start = time.monotonic()
            with Watch(process, url) as watch:
                results = asyncio.run(_load(url, port, bodies, slow_s))
            wall = time.monotonic() - start
            statuses = _server_statuses(httpx.get(url + "/metrics", timeout=30).text)
            sigterm_s = _sigterm_exit_s(process, port, give_up_s=30.0)
            exit_code = process.returncode
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if line.startswith("ERROR")]
    valid = sorted(seconds for outcome, seconds in results["valid"] if outcome == "200")
    return {
        "checkout": str(checkout or ROOT), "clients": sum(MIX.values()), "mix": MIX,
        "answers": {kind: dict(Counter(o for o, _ in r)) for kind, r in results.items()},
        "slow_seconds_max": max(s for _, s in results["slow"]),
        "valid_ok": len(valid),
        "valid_p50_s": float(np.percentile(valid, 50)) if valid else None,
        "valid_p99_s": float(np.percentile(valid, 99)) if valid else None,
        "healthz_worst_s": max(watch.healthz), "healthz_probes": len(watch.healthz),
        "healthz_failures": watch.healthz_failures,
        "rss_baseline_mb": baseline / MB, "rss_peak_mb": watch.rss_peak / MB,
        "server_counted": statuses, "server_error_lines": len(errors),
        "server_error_examples": sorted(set(e[:120] for e in errors))[:5],
        "sigterm_exit_s": sigterm_s, "sigterm_exit_code": exit_code,
        "load_wall_s": wall, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }


def table(r: dict[str, Any]) -> str:
    lines = [f"ubc-serve abuse run: {r['clients']} concurrent clients; server from "
             f"{r['checkout']}",
             f"load average before {'/'.join(f'{x:.2f}' for x in r['loadavg_before'])}, "
             f"after {'/'.join(f'{x:.2f}' for x in r['loadavg_after'])} (1/5/15 min)", "",
             f"{'kind':<14}{'n':>4}  answers (HTTP status, or what the client saw)"]
    for kind, n in MIX.items():
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["answers"][kind].items()))
        lines.append(f"{kind:<14}{n:>4}  {answers}")
    p50, p99 = r["valid_p50_s"], r["valid_p99_s"]
    growth = r["rss_peak_mb"] - r["rss_baseline_mb"]
    lines += [
        "",
        f"valid requests answered 200    {r['valid_ok']} of {MIX['valid']}",
        "valid latency p50 / p99        " + (f"{p50:.2f} s / {p99:.2f} s" if p50 else "-"),
        f"/healthz worst latency         {r['healthz_worst_s']:.3f} s "
        f"({r['healthz_probes']} probes, {r['healthz_failures']} failed)",
        f"server peak RSS                {r['rss_peak_mb']:,.0f} MB "
        f"(baseline {r['rss_baseline_mb']:,.0f} MB, +{growth:,.0f})",
        f"slow clients: longest held     {r['slow_seconds_max']:.1f} s",
        "server-counted statuses        "
        + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(r["server_counted"].items())),
        f"server ERROR log lines         {r['server_error_lines']}",
        f"exit after SIGTERM, 1 slow     {r['sigterm_exit_s']:.1f} s "
        f"(exit code {r['sigterm_exit_code']})",
        f"load phase wall time           {r['load_wall_s']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, help="serve the ubc package of this "
                        "checkout (its ubc/ must hold the built _native module)")
    parser.add_argument("--slow-s", type=float, default=20.0,
                        help="how long a slow client trickles before it gives up (default 20)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here")
    args = parser.parse_args(argv)
    result = run(args.checkout.resolve() if args.checkout else None, args.slow_s,
                 args.server_log)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
