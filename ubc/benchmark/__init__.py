"""Latency and throughput of every backend of a bundle side by side, with parity against
eager PyTorch fp32, preprocessing next to its peers and the ``ubc-infer`` pipeline end to
end (``ubc-bench``).

>>> from ubc.benchmark import BenchOptions, run_bench, print_report
>>> report = run_bench("model.ubc", BenchOptions(batch_sizes=(1, 8)))   # doctest: +SKIP
>>> print_report(report.to_json())                                       # doctest: +SKIP
"""

from __future__ import annotations

from ubc.benchmark.plan import BenchOptions
from ubc.benchmark.plot import write_plot
from ubc.benchmark.report import fatal, print_report, summary_line, to_markdown, write_json
from ubc.benchmark.results import SCHEMA, BenchReport, validate
from ubc.benchmark.runner import run_bench
from ubc.engine.registry import VARIANTS  # the variants ubc-bench can time

__all__ = ["SCHEMA", "VARIANTS", "BenchOptions", "BenchReport", "fatal", "print_report",
           "run_bench", "summary_line", "to_markdown", "validate", "write_json",
           "write_plot"]
