"""The ``--plot`` PNG of a ``ubc-bench`` JSON document: throughput against batch size per
backend (left) and latency percentiles p50 / p95 / p99 per backend and batch (right)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any


def _series(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by "variant precision" (marked when informational or parity failed),
    sorted by batch."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in doc["rows"]:
        failed = row.get("parity") and not row["parity"]["passed"]
        label = f"{row['variant']} {row['precision']}" + \
            (" (info)" if row["informational"] else "") + (" (parity FAIL)" if failed else "")
        groups[label].append(row)
    return {k: sorted(v, key=lambda r: r["batch"]) for k, v in groups.items()}


def _throughput(ax: Any, series: dict[str, list[dict[str, Any]]]) -> None:
    for label, rows in series.items():
        batches = [r["batch"] for r in rows]
        ax.plot(batches, [r["throughput"] for r in rows], marker="o",
                linestyle="--" if rows[0]["baseline"] else "-",
                label=label + (" (baseline)" if rows[0]["baseline"] else ""))
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for rows in series.values() for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size (slices)")
    ax.set_ylabel("throughput (slices/s, at the median latency)")
    ax.set_title("throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def _latency(ax: Any, series: dict[str, list[dict[str, Any]]]) -> None:
    batches = sorted({r["batch"] for rows in series.values() for r in rows})
    width = 0.8 / max(len(series), 1)
    for i, (label, rows) in enumerate(series.items()):
        by_batch = {r["batch"]: r["latency"] for r in rows}
        xs = [j + (i - (len(series) - 1) / 2) * width for j, b in enumerate(batches)
              if b in by_batch]
        lat = [by_batch[b] for b in batches if b in by_batch]
        bars = ax.bar(xs, [s["p50"] for s in lat], width=width, label=label, alpha=0.8)
        colour = bars.patches[0].get_facecolor() if bars.patches else None
        ax.vlines(xs, [s["p50"] for s in lat], [s["p99"] for s in lat], colors="black",
                  linewidth=1)
        ax.scatter(xs, [s["p95"] for s in lat], marker="_", color="black", s=80,
                   linewidths=2, zorder=3)
        ax.scatter(xs, [s["p99"] for s in lat], marker="^", color=colour, edgecolor="black",
                   s=20, zorder=3)
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yscale("log")
    ax.set_xlabel("batch size (slices)")
    ax.set_ylabel("latency per batch (ms): bar p50, tick p95, triangle p99")
    ax.set_title("latency percentiles")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")


def write_plot(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw the two panels into the PNG at ``path`` (matplotlib, no display needed)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    series = _series(doc)
    if not series:
        raise ValueError("no engine rows to plot: no backend ran")
    b = doc["bundle"]
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    _throughput(left, series)
    _latency(right, series)
    cpu = doc["machine"]["cpu"]["model"]
    gpus = doc["machine"]["gpus"]
    where = gpus[0]["name"] if doc["options"]["device"].startswith("cuda") and gpus else cpu
    fig.suptitle(f"{b['name']} {b['size'][0]}x{b['size'][1]} on {where} "
                 f"({doc['created'][:10]})", fontsize="medium")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
