"""How large the run report is and how fast it opens, for 100 and 5,000 cases, in headless
chromium (Debian's, driven by Playwright), from file://.

The rows are a real run's (a tiny bundle over phantoms, through ``score_archive`` with
``--report``), repeated under new case ids, every case with its own overlay picture as a
run with ``--report`` leaves it. Reported per size: the page's bytes, its pictures' bytes,
the time until the table is built, laid out and painted (in-page ``performance.now()``),
the wall time of the whole load as a user waits for it, and the time one sort by lesion
volume takes until it is painted.

    python bench/bench_report.py [--sizes 100,5000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _real_run(folder: Path) -> tuple[list, Path]:
    """Rows and overlays of a real run over six phantoms (engine: the tests' stand-in)."""
    from scoring_archive import PHANTOM_SHAPE, FakeEngine, make_tiny_bundle

    from ubc.scoring import OutputSpec, read_results, score_archive
    from ubc.synth import write_archive

    archive = write_archive(folder / "archive", 6, seed=5, shape=PHANTOM_SHAPE)
    spec = OutputSpec.of(folder / "rows.csv", report=folder / "run.html")
    score_archive(make_tiny_bundle(folder / "tiny.ubc"), archive, spec, engine=FakeEngine())
    return read_results(folder / "rows.csv"), folder / "run_files" / "overlays"


def _report(rows: list, overlays: Path, size: int, folder: Path) -> Path:
    from ubc.scoring import safe_name
    from ubc.scoring.report import RunInfo, write_report

    pictures = folder / f"r{size}_files" / "overlays"
    pictures.mkdir(parents=True)
    cases = []
    for i in range(size):
        row = dataclasses.replace(rows[i % len(rows)], case_id=f"case-{i:05d}")
        shutil.copy(overlays / f"{safe_name(rows[i % len(rows)].case_id)}.png",
                    pictures / f"{row.case_id}.png")
        cases.append(row)
    return write_report(cases, folder / f"r{size}.html", run=RunInfo.now())


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright
    from test_report import SORT_AND_PAINT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,5000")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        print("chromium is not installed (Debian: apt-get install chromium)")
        return 1
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        folder = Path(tmp)
        rows, overlays = _real_run(folder)
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        print("| cases | page | pictures | painted (in page) | load wall | one sort, painted |")
        print("|---|---|---|---|---|---|")
        for size in (int(s) for s in args.sizes.split(",")):
            page_path = _report(rows, overlays, size, folder)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            start = time.perf_counter()
            page.goto(page_path.as_uri())
            page.wait_for_selector("body[data-ready]")
            wall = time.perf_counter() - start
            ready = float(page.evaluate("document.body.dataset.ready"))
            sort_ms = page.evaluate(SORT_AND_PAINT)
            print(f"| {size} | {page_path.stat().st_size / 1e3:.0f} kB | "
                  f"{_bytes(page_path.with_name(f'r{size}_files')) / 1e6:.1f} MB | "
                  f"{ready:.0f} ms | {wall * 1000:.0f} ms | {sort_ms:.0f} ms |")
            page.close()
        browser.close()
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
