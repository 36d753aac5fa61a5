"""Benchmark plumbing: each benchmark records its median; the session ends with the ratios."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

_FIGURES: dict[str, dict[str, float]] = {}
FLOOR = "copy of the output bytes (floor)"  # a group's row of this name: "Nx floor" on each row


@pytest.fixture(scope="session")
def figures() -> dict[str, dict[str, float]]:
    """{group: {name: median seconds}}, filled by the benchmarks, summarised at the end."""
    return _FIGURES


def record(figures: dict[str, dict[str, float]], group: str, name: str, benchmark) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        figures.setdefault(group, {})[name] = float(benchmark.stats.stats.median)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("UBC figures (median; ratio = baseline time / this time)")
    for group, times in _FIGURES.items():
        terminalreporter.write_line(f"[{group}]")
        base_name = next(iter(times))
        floor = times.get(FLOOR)
        for name, seconds in times.items():
            ratio = times[base_name] / seconds
            vs_floor = f"   {seconds / floor:6.2f}x floor" if floor else ""
            terminalreporter.write_line(f"  {name:<34} {seconds * 1e3:10.2f} ms   "
                                        f"x{ratio:7.2f} vs {base_name}{vs_floor}")
    out = os.environ.get("UBC_BENCH_JSON")
    if out:
        Path(out).write_text(json.dumps(_FIGURES, indent=2))
