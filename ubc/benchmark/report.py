"""Rendering a ``ubc-bench`` JSON document (``BenchReport.to_json``): a rich table on the
terminal, the JSON file, and Markdown for bench/RESULTS.md. Everything reads the JSON form,
so a saved run renders like a live one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ubc.atomic import atomic_write_text
from ubc.benchmark.machine import describe

Doc = dict[str, Any]

_ENGINE_COLUMNS = ("backend", "prec", "batch", "slices/s", "vs eager", "best/s", "p50 ms",
                   "p95 ms", "p99 ms", "spread", "n", "cores", "peak RSS MiB", "|dP(HGG)|",
                   "Dice", "rel dlogit", "parity")
_GPU_COLUMN = 13  # "GPU MiB" goes after "peak RSS MiB" on CUDA


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _ms(x: float) -> str:
    return f"{x:,.2f}" if x < 10 else f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def _parity_cells(row: dict[str, Any]) -> list[str]:
    parity, info = row.get("parity"), " (info)" if row["informational"] else ""
    if parity is None:
        return ["-", "-", "-", "not run" + info]
    if parity["extra"].get("reference"):
        return ["0", "1", "0", "reference"]
    verdict = "pass" if parity["passed"] else "fail" if info else "FAIL"
    return [f"{parity['max_abs_p_hgg']:.1e}", f"{parity['mask_dice']:.4f}",
            f"{parity['max_rel_class_logits']:.1e}", verdict + info]


def parity_failed(row: dict[str, Any]) -> bool:
    return row.get("parity") is not None and not row["parity"]["passed"]


def fatal(doc: Doc) -> list[str]:
    """What makes ``ubc-bench`` exit 1: a row ``backend="auto"`` could pick that failed
    parity (a reduced CPU precision below its gate is only kept out of ``auto``, see
    ``ubc.parity.GATED``), or such a backend (or the pipeline) that crashed. Informational
    rows are not."""
    from ubc.parity import GATED

    parity = {f"{r['variant']} {r['precision']}: parity failed" for r in doc["rows"]
              if parity_failed(r) and not r["informational"]
              and (r["device"].partition(":")[0], r["precision"]) not in GATED}
    return sorted(parity) + [f"{u['name']} {u.get('precision', '')}: {u['reason']}"
                             for u in doc["unavailable"]
                             if u["failed"] and not u.get("informational")]


def engine_cells(row: dict[str, Any]) -> list[str]:
    """The table cells of one engine row (``_ENGINE_COLUMNS``, GPU memory appended on CUDA)."""
    lat = row["latency"]
    speedup = "-" if row.get("speedup") is None else f"{row['speedup']:.2f}x"
    cells = [row["variant"], row["precision"], str(row["batch"]), _num(row["throughput"]),
             speedup, _num(row["batch"] * 1e3 / lat["min"]), _ms(lat["p50"]), _ms(lat["p95"]),
             _ms(lat["p99"]),
             f"{lat['iqr'] / lat['p50']:.1%}" if lat["p50"] else "-", str(lat["n"]),
             _num(row.get("cores_used"), 1), _num(row["host_peak_mib"], 0),
             *_parity_cells(row)]
    if row["device"].startswith("cuda"):
        cells.insert(_GPU_COLUMN, _num(row.get("device_peak_mib"), 0))
    return cells


def engine_columns(doc: Doc) -> list[str]:
    columns = list(_ENGINE_COLUMNS)
    if doc["options"].get("device", "cpu").startswith("cuda"):
        columns.insert(_GPU_COLUMN, "GPU MiB")
    return columns


def prep_cells(row: dict[str, Any]) -> list[str]:
    lat = row["latency"]
    per_second = 1e3 / lat["p50"] if lat["p50"] else 0.0
    diff, mean = row.get("max_abs_diff"), row.get("mean_abs_diff")
    return [row["group"], row["name"], _ms(lat["p50"]),
            f"{lat['iqr'] / lat['p50']:.1%}" if lat["p50"] else "-", str(lat["n"]),
            f"{per_second:.2f}", f"{per_second * row['slices']:,.0f}",
            f"{row['ratio']:.2f}x",
            "-" if diff is None else f"{diff:.1e} / {mean:.1e}"]


PREP_COLUMNS = ("stage", "method", "ms/volume", "spread", "n", "volumes/s", "slices/s",
                "time vs ours", "|d| vs NumPy ref (max / mean)")


def fastest(doc: Doc, precision: str | None = None, *, pickable: bool = False,
            batch: int | None = None) -> dict[str, Any] | None:
    """The engine row of highest throughput (at ``precision``/``batch`` if given; only
    those ``backend="auto"`` could pick if ``pickable``) whose parity did not fail."""
    rows = [r for r in doc["rows"] if not parity_failed(r)
            and precision in (None, r["precision"]) and batch in (None, r["batch"])
            and not (pickable and r["informational"])]
    return max(rows, key=lambda r: r["throughput"], default=None)


def _describe_best(best: dict[str, Any], doc: Doc) -> str:
    line = f"{best['variant']} {best['precision']}" \
           f"{' (informational)' if best['informational'] else ''} at batch " \
           f"{best['batch']}, {best['throughput']:.1f} slices/s"
    if best.get("speedup") is not None:
        line += f", {best['speedup']:.2f}x eager PyTorch fp32 at the same batch"
    base = [r for r in doc["rows"] if r["baseline"]]
    if base:
        top = max(base, key=lambda r: r["throughput"])
        if top["batch"] != best["batch"]:
            line += f"; {best['throughput'] / top['throughput']:.2f}x eager's best " \
                    f"({top['throughput']:.1f} slices/s at batch {top['batch']})"
    return line


def summary_line(doc: Doc) -> str:
    """"fastest on cpu: onnxruntime fp32 at batch 32, 14.1 slices/s, 1.85x eager PyTorch
    fp32 at the same batch", plus the fastest fp32 row when the fastest is not fp32."""
    best = fastest(doc)
    if best is None:
        return "no backend ran (or none passed its parity check)"
    line = f"fastest on {best['device']}: {_describe_best(best, doc)}"
    exact = fastest(doc, "fp32")
    if best["precision"] != "fp32" and exact is not None:
        line += f"\nfastest at fp32 on {exact['device']}: {_describe_best(exact, doc)}"
    return line


def choice_line(doc: Doc) -> str | None:
    """What ``backend="auto"`` picks next to the measured winner among what it could pick,
    at the largest batch size; None when ``auto`` picks nothing."""
    choice = doc.get("auto_choice")
    if not choice:
        return None
    precision = doc.get("auto_precision") or "fp32"
    line = f'ubc.engine.load(backend="auto") picks: {choice} {precision}'
    batch = max((r["batch"] for r in doc["rows"]), default=None)
    mine = next((r for r in doc["rows"] if r["variant"] == choice and r["batch"] == batch
                 and r["precision"] == precision), None)
    best = fastest(doc, pickable=True, batch=batch)
    if mine is None or best is None:
        return line
    line += f" ({mine['throughput']:.1f} slices/s at batch {batch}); measured winner of " \
            f"what it could pick: {best['variant']} {best['precision']} " \
            f"({best['throughput']:.1f} slices/s, {best['throughput'] / mine['throughput']:.2f}x)"
    if best is not mine and best["throughput"] > 1.1 * mine["throughput"]:
        line += f"; name it: backend={best['backend']!r}, precision={best['precision']!r}"
    return line


LEGEND = ("slices/s: batch / median latency; best/s: batch / fastest call (what the machine "
          "does when nothing else runs); spread: IQR / median latency; cores: CPU time / "
          "wall time of the process while timed (fewer than the runtime's threads: other "
          "processes took the CPU); parity against eager PyTorch fp32 on the CPU: max "
          "|dP(HGG)|, mask Dice, rel dlogit = max |d class logit| / max(1, max |reference "
          "logit|); (info): informational, a variant or precision the registry's parity "
          "checks and backend=\"auto\" never consider: a failed parity there is not fatal")


def _rounds(options: dict[str, Any]) -> str:
    rounds = options.get("rounds", 1)
    return f", in {rounds} interleaved rounds" if rounds > 1 else ""


def _header(doc: Doc) -> list[str]:
    b, o = doc["bundle"], doc["options"]
    weights = "trained" if b["trained"] else "untrained (random) weights"
    return [
        f"ubc-bench {doc['created']}: {b['name']} ({b['arch']}, {b['size'][0]}x{b['size'][1]}"
        f" px of {b['target_spacing'][0]:g} mm, {weights})",
        f"machine: {describe(doc['machine'])}",
        f"timing: {o['warmup']} warm-up + up to {o['iters']} timed calls per batch size "
        f"(at most {o['max_seconds']:g} s{_rounds(o)}), inputs rotated among buffers, "
        f"{'a fresh process per backend' if o['isolate'] else 'all in one process'}; "
        f"parity on {o['parity_source']}",
    ]


def print_report(doc: Doc, console: Any = None) -> None:
    """The report as rich tables on ``console`` (stdout by default)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: do not squeeze the tables to 80
            console = Console(width=200)
    for line in _header(doc):
        console.print(line, highlight=False, markup=False)
    table = Table(title="engines (latency per batch; throughput = batch / median latency)")
    for column in engine_columns(doc):
        table.add_column(column, justify="left" if column in ("backend", "prec") else "right")
    best = fastest(doc)
    for row in doc["rows"]:
        style = "bold green" if row is best else None if not parity_failed(row) else \
            "yellow" if row["informational"] else "red"
        table.add_row(*engine_cells(row), style=style)
    console.print(table)
    console.print(LEGEND, highlight=False, markup=False, style="dim")
    console.print(summary_line(doc), highlight=False, markup=False)
    if choice_line(doc):
        console.print(choice_line(doc), highlight=False, markup=False)
    for item in doc["unavailable"]:
        console.print(unavailable_line(item), highlight=False, markup=False)
    if doc["preprocessing"]:
        prep = Table(title="preparing one volume (p50)")
        for column in PREP_COLUMNS:
            prep.add_column(column, justify="left" if column in ("stage", "method") else "right")
        for row in doc["preprocessing"]:
            prep.add_row(*prep_cells(row), style="bold" if row["ours"] else None)
        console.print(prep)
    if doc.get("pipeline"):
        console.print(pipeline_line(doc["pipeline"]), highlight=False, markup=False)
    for note in doc["notes"]:
        console.print(f"note: {note}", highlight=False, markup=False)


def unavailable_line(item: dict[str, Any]) -> str:
    """"not measured: aoti fp32: <why>", "FAILED: ...", "failed (informational): ..."."""
    label = "not measured" if not item["failed"] else \
        "failed (informational)" if item.get("informational") else "FAILED"
    what = " ".join(x for x in (item["name"], item.get("precision", "")) if x)
    return f"{label}: {what}: {item['reason']}"


def pipeline_line(p: dict[str, Any]) -> str:
    shape = "x".join(map(str, p["volume_shape"]))
    volumes = "volume" if p["cases"] == 1 else "volumes"
    busy = p["stage_seconds"].get("engine", 0.0) / p["wall_seconds"] if p["wall_seconds"] else 0.0
    return (f"ubc-infer pipeline: {p['cases']} {volumes} of {shape} in {p['wall_seconds']:.1f} s"
            f" = {p['volumes_per_second']:.3f} volumes/s, {p['slices_per_second']:.1f} "
            f"slices/s, engine busy {busy:.0%} ({p['backend']} {p['precision']}, batch "
            f"{p['batch_size']}{', ' + str(p['failed']) + ' failed' if p['failed'] else ''})")


def write_json(doc: Doc, path: str | os.PathLike[str]) -> Path:
    """Write the document atomically (a killed run leaves no half file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, json.dumps(doc, indent=2) + "\n")


def _md_row(cells: Any) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _md_table(columns: Any, rows: list[list[str]]) -> list[str]:
    return [_md_row(columns), "|" + "---|" * len(columns), *map(_md_row, rows)]


def to_markdown(doc: Doc, *, title: str | None = None, plot: str | None = None) -> str:
    """The report as a Markdown section (header, tables, unavailable, notes)."""
    m = doc["machine"]
    cpu = m["cpu"]
    lines = [f"## {title or 'ubc-bench'}", "", f"- command: `{doc['command']}`",
             f"- date: {doc['created']} (run took {doc['seconds']:.0f} s)",
             f"- machine: {describe(m)}; CPU flags {' '.join(cpu['flags']) or '-'}; "
             f"{m['memory_gib']} GiB",
             f"- load average at start {m['load_average']}, at end "
             f"{doc.get('load_average_end', [])}",
             "- libraries: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)]
    lines += [f"- {line}" for line in _header(doc)[0:1] + _header(doc)[2:]]
    lines += ["", *_md_table(engine_columns(doc), [engine_cells(r) for r in doc["rows"]]), "",
              f"_{LEGEND}_", ""]
    lines += [f"**{line}**  " for line in summary_line(doc).splitlines()] + [""]
    if choice_line(doc):
        lines += [str(choice_line(doc)), ""]
    lines += [f"- {unavailable_line(u)}" for u in doc["unavailable"]]
    if doc["preprocessing"]:
        lines += ["", *_md_table(PREP_COLUMNS, [prep_cells(r) for r in doc["preprocessing"]])]
    if doc.get("pipeline"):
        lines += ["", pipeline_line(doc["pipeline"])]
    if doc["notes"]:
        lines += [""] + [f"- note: {n}" for n in doc["notes"]]
    if plot:
        lines += ["", f"![throughput and latency]({plot})"]
    return "\n".join(lines) + "\n"
