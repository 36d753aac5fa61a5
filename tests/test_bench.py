"""``ubc-bench`` (ubc.benchmark, ubc.cli.bench) on the tiny exported bundle of the engine
tests (64 x 64, TorchScript + ONNX): small volumes, few calls, one thread per runtime."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from ubc.benchmark import VARIANTS, BenchOptions, fatal, run_bench, to_markdown, validate
from ubc.benchmark.plan import plan
from ubc.benchmark.timing import (
    MIN_ITERATIONS,
    Stats,
    buffer_count,
    rotating_inputs,
    time_calls,
)
from ubc.bundle import Bundle
from ubc.engine.registry import BASELINE

BATCHES = (1, 2)
SMALL_VOLUME = (96, 96, 24)


def _options(**changes) -> BenchOptions:
    base = dict(batch_sizes=BATCHES, warmup=1, iters=3, max_seconds=1.0, threads=1,
                parity_slices=32, isolate=False, pipeline_cases=2, volume_shape=SMALL_VOLUME)
    return BenchOptions(**{**base, **changes})


@pytest.fixture(scope="module")
def torch_threads():
    """Engines set torch's thread count process-wide: put it back afterwards."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def report(exported_bundle: Path, torch_threads) -> dict:
    """One in-process run over every variant, as JSON."""
    return run_bench(exported_bundle, _options(), command="test").to_json()


def test_a_row_per_runnable_backend_and_batch(report, exported_bundle):
    cells, unavailable = plan(Bundle(exported_bundle), "cpu", _options())
    expected = {(c.variant.name, c.precision, b) for c in cells for b in BATCHES}
    got = {(r["variant"], r["precision"], r["batch"]) for r in report["rows"]}
    assert got == expected
    names = {c.variant.name for c in cells}
    assert {"torch", "torchscript", "onnxruntime"} <= names
    # nothing is silently dropped: every variant was measured or listed with a reason
    listed = names | {u["name"] for u in report["unavailable"] if u["stage"] == "engine"}
    assert listed == set(VARIANTS)
    assert report["auto_choice"] in names  # what backend="auto" would run, measured too


def test_variants_and_precisions_come_from_the_registry(report, exported_bundle):
    """By default every precision each variant offers on the CPU is timed or listed with a
    reason; those backend="auto" never picks are marked informational."""
    bundle = Bundle(exported_bundle)
    cells, unavailable = plan(bundle, "cpu", _options())
    planned = {(c.variant.name, c.precision) for c in cells} | \
        {(u.name, u.precision) for u in unavailable if u.precision}
    assert planned == {(v.name, p) for v in VARIANTS.values() for p in v.offered("cpu")}
    assert ("openvino", "bf16") in planned  # offered on the CPU: timed, or listed with why
    marks = {(c.variant.name, c.precision): c.informational for c in cells}
    assert marks[("torch", "fp32")] is False and marks[("onnxruntime", "fp32")] is False
    for c in cells:  # informational: what parity checks and backend="auto" never consider
        checked = c.variant.checked_precisions("cpu", bundle) if c.variant.auto else ()
        assert c.informational == (c.precision not in checked), (c.variant.name, c.precision)
    rows = {(r["variant"], r["precision"]): r["informational"] for r in report["rows"]}
    assert rows == marks


def test_exit_code_counts_only_what_auto_could_pick(report):
    import copy

    doc = copy.deepcopy(report)  # whatever reduced precisions did on random weights
    for row in doc["rows"]:
        row["parity"]["passed"] = True
    assert fatal(doc) == []
    for row in doc["rows"]:
        if row["variant"] == "onnxruntime":
            row["parity"]["passed"] = False
    assert fatal(doc) == ["onnxruntime fp32: parity failed"]
    for row in doc["rows"]:
        row["informational"] = row["informational"] or row["variant"] == "onnxruntime"
    assert fatal(doc) == []  # an informational failure is shown, not fatal
    crashed = dict(doc, unavailable=[{"stage": "engine", "name": "openvino", "reason": "boom",
                                      "precision": "bf16", "failed": True,
                                      "informational": True}])
    assert fatal(crashed) == []
    crashed["unavailable"][0]["informational"] = False
    assert fatal(crashed) == ["openvino bf16: boom"]


def test_unavailable_backends_come_with_a_reason(report):
    engines = {u["name"]: u for u in report["unavailable"] if u["stage"] == "engine"}
    assert "cuda" in engines["cudagraphs"]["reason"]
    assert "tensorrt" in engines["tensorrt"]["reason"].lower()
    assert "ubc-export" in engines["aoti"]["reason"]  # the bundle has no package: the fix
    assert not any(u["failed"] for u in report["unavailable"])


def test_json_schema(report):
    assert validate(report) == []
    assert validate(json.loads(json.dumps(report))) == []
    broken = dict(report, rows=[{k: v for k, v in report["rows"][0].items() if k != "batch"}])
    assert any("missing 'batch'" in p for p in validate(broken))
    row = json.loads(json.dumps(report["rows"][1]))  # the parity schema is ubc.parity's
    del row["parity"]["mask_dice"]
    row["parity"]["tolerance"]["p_hgg"] = "small"
    assert validate(dict(report, rows=[row])) == [
        "report.rows[0].parity: missing 'mask_dice'",
        "report.rows[0].parity.tolerance.p_hgg: expected float, got str"]
    machine = report["machine"]
    assert machine["cpu"]["usable_cores"] >= 1 and machine["libraries"]["torch"]
    assert machine["cpu"]["usable_cores"] <= machine["cpu"]["logical_cores"]
    assert machine["memory_gib"] > 0 and machine["cpu"]["model"]
    assert len(machine["load_average"]) == 3
    assert report["options"]["device"] == "cpu"


def test_parity_columns_within_tolerance(report):
    for row in report["rows"]:
        parity = row["parity"]
        assert parity is not None and parity["slices"] == 32
        if row["baseline"]:
            assert parity["extra"]["reference"] and parity["max_abs_p_hgg"] == 0
        elif row["precision"] == "fp32":
            assert parity["passed"], (row["variant"], parity["failures"])
            assert parity["max_abs_p_hgg"] <= 1e-3 and parity["mask_dice"] >= 0.999
            assert parity["max_rel_class_logits"] <= 1e-3


def test_timings_and_speedups(report):
    for row in report["rows"]:
        lat = row["latency"]
        assert MIN_ITERATIONS <= lat["n"] <= 3
        assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert row["throughput"] == pytest.approx(row["batch"] * 1e3 / lat["p50"])
        assert row["speedup"] > 0 and row["host_peak_mib"] > 0 and row["threads"] == 1
        assert row["cores_used"] > 0 and row["preemptions_per_call"] >= 0
        if row["baseline"]:
            assert row["variant"] == BASELINE and row["speedup"] == pytest.approx(1.0)


def test_end_to_end_rows(report):
    prep = {r["name"]: r for r in report["preprocessing"]}
    native = prep["ubc native, all cores"]
    assert native["ratio"] == 1.0 and native["slices"] == SMALL_VOLUME[2]
    assert prep["NumPy reference"]["max_abs_diff"] == 0
    assert prep["torch re-implementation"]["max_abs_diff"] < 1e-4
    assert "ubc (load_volume + native)" in prep
    if "MONAI chain" not in prep:  # monai absent: said so, with the install command
        reason = next(u["reason"] for u in report["unavailable"] if u["name"] == "MONAI chain")
        assert "pip install" in reason
    pipeline = report["pipeline"]
    assert pipeline["cases"] == 2 and pipeline["failed"] == 0
    assert pipeline["volumes_per_second"] > 0
    assert 0 < pipeline["slices"] <= 2 * SMALL_VOLUME[2]  # slices with brain in them


def test_renderers(report, tmp_path):
    from rich.console import Console

    from ubc.benchmark import print_report, write_json, write_plot

    console = Console(record=True, width=240)
    print_report(report, console)
    text = console.export_text()
    for variant in {r["variant"] for r in report["rows"]}:
        assert variant in text
    assert "not measured: tensorrt" in text and "fastest on cpu" in text
    assert 'load(backend="auto") picks' in text and "measured winner" in text
    busy = report["pipeline"]["stage_seconds"]["engine"] / report["pipeline"]["wall_seconds"]
    assert f"engine busy {busy:.0%}" in text  # how much of the run the engine was fed
    markdown = to_markdown(report, plot="plot.png")
    assert "| backend | prec | batch |" in markdown and "![throughput" in markdown
    png = write_plot(report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(write_json(report, tmp_path / "r.json").read_text()) == report


def test_a_failing_backend_is_reported_and_the_others_still_run(exported_bundle, torch_threads,
                                                               monkeypatch):
    import ubc.benchmark.runner as runner

    real = runner.run_cell

    def flaky(spec, progress=None):
        if spec.variant == "onnxruntime":
            raise RuntimeError("simulated crash")
        return real(spec, progress)

    monkeypatch.setattr(runner, "run_cell", flaky)
    doc = run_bench(exported_bundle, _options(variants=("onnxruntime",), batch_sizes=(2,),
                                              preprocessing=False, pipeline_cases=0,
                                              parity_slices=0)).to_json()
    assert [r["variant"] for r in doc["rows"]] == [BASELINE]  # the baseline always runs
    failed = [u for u in doc["unavailable"] if u["failed"]]
    assert [(u["name"], u["reason"]) for u in failed] == \
        [("onnxruntime", "RuntimeError: simulated crash")]
    assert any("onnxruntime fp32 failed" in n for n in doc["notes"])


def test_rounds_interleave_and_merge(exported_bundle, torch_threads):
    doc = run_bench(exported_bundle, _options(variants=("onnxruntime",), batch_sizes=(2,),
                                              iters=6, rounds=2, preprocessing=False,
                                              pipeline_cases=0)).to_json()
    assert [r["variant"] for r in doc["rows"]] == [BASELINE, "onnxruntime"]
    for row in doc["rows"]:
        assert row["rounds"] == 2 and row["latency"]["n"] == len(row["samples_ms"]) == 6
        assert row["latency"]["p50"] == pytest.approx(float(np.median(row["samples_ms"])))
        assert row["parity"] is not None  # checked once, in the last round
    assert "2 interleaved rounds" in to_markdown(doc)


def test_cli_isolated_run_writes_json(exported_bundle, tmp_path, capsys):
    from ubc.cli.bench import main

    out = tmp_path / "bench.json"
    code = main([str(exported_bundle), "--backends", "onnxruntime", "--batch-sizes", "2",
                 "--warmup", "0", "--iters", "3", "--threads", "1", "--no-preprocess",
                 "--pipeline-cases", "0", "--parity-slices", "0", "--json", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert validate(doc) == []
    assert [(r["variant"], r["isolated"], r["parity"]) for r in doc["rows"]] == \
        [("torch", True, None), ("onnxruntime", True, None)]
    assert doc["command"].startswith("ubc-bench ")
    assert "onnxruntime" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--backends", "torch,nope"], "unknown backend(s) nope"),
    (["--precisions", "fp64"], "unknown precision(s) fp64"),
    (["--size", "224x224"], "takes 64x64"),
])
def test_cli_usage_errors(exported_bundle, capsys, args, words):
    from ubc.cli.bench import EXIT_USAGE, main

    assert main([str(exported_bundle), *args]) == EXIT_USAGE
    assert words in capsys.readouterr().err


def test_monai_missing_names_the_install(monkeypatch):
    import sys

    from ubc.benchmark.preprocessing import monai_chain
    from ubc.bundle import Preprocessing

    monkeypatch.setitem(sys.modules, "monai.transforms", None)  # import fails as if absent
    with pytest.raises(ImportError, match=r"pip install 'ubc\[bench\]'"):
        monai_chain(Preprocessing())


def test_stats_percentiles():
    samples = [float(x) for x in range(1, 101)]
    stats = Stats.of(samples)
    assert stats.n == 100 and stats.p50 == pytest.approx(np.percentile(samples, 50))
    assert stats.p99 == pytest.approx(np.percentile(samples, 99))
    assert stats.iqr == pytest.approx(49.5) and stats.min == 1 and stats.max == 100
    assert Stats.of([2.0]).stdev == 0.0
    with pytest.raises(ValueError):
        Stats.of([])


def test_time_calls_excludes_warmup_and_rotates_inputs():
    seen: list[int] = []
    inputs = [np.full(1, i) for i in range(4)]
    m = time_calls(lambda x: seen.append(int(x[0])), inputs, warmup=2, iters=6)
    assert len(m.samples_ms) == 6 and len(seen) == 8
    assert seen == [i % 4 for i in range(8)]  # warm-up first, then on through the buffers
    assert m.buffers == 4 and m.warmup == 2


def test_time_calls_stops_at_the_budget_but_not_before_the_minimum():
    import time

    m = time_calls(lambda x: time.sleep(0.002), [None], warmup=0, iters=1000,
                   max_seconds=0.001)
    assert len(m.samples_ms) == MIN_ITERATIONS
    assert all(s >= 2.0 for s in m.samples_ms)
    assert m.wall_seconds >= 0.006 and m.cores_used < 0.5  # asleep, not on a core


def test_time_calls_counts_the_cpu_the_process_got():
    import time

    def spin(_):
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass

    m = time_calls(spin, [None], warmup=0, iters=5)
    assert 0.0 < m.cores_used <= 1.05 and m.preemptions >= 0


def test_rotating_buffers_are_distinct_and_bounded():
    slices = np.arange(10 * 4, dtype=np.float32).reshape(10, 1, 2, 2)
    buffers = rotating_inputs(slices, 3, 5)
    assert len(buffers) == 5 and all(b.shape == (3, 1, 2, 2) and b.flags.c_contiguous
                                     for b in buffers)
    assert len({b.tobytes() for b in buffers}) == 5
    assert all(not np.shares_memory(a, b) for a, b in itertools.combinations(buffers, 2))
    assert buffer_count(1 << 20, calls=1000, cache_bytes=32 << 20) == 64
    assert buffer_count(1 << 20, calls=10, cache_bytes=32 << 20) == 10
    assert buffer_count(1 << 30, calls=10, cache_bytes=32 << 20) == 2


@pytest.mark.gpu
def test_cuda_rows_have_device_timing_and_memory(exported_bundle, torch_threads):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    doc = run_bench(exported_bundle, _options(device="cuda", precisions=("fp32", "fp16"),
                                              variants=("torch", "cudagraphs"),
                                              preprocessing=False, pipeline_cases=0)
                    ).to_json()
    assert validate(doc) == []
    assert {(r["variant"], r["precision"]) for r in doc["rows"]} == \
        {("torch", "fp32"), ("torch", "fp16"), ("cudagraphs", "fp32"), ("cudagraphs", "fp16")}
    for row in doc["rows"]:
        assert row["device"] == "cuda" and row["device_latency"]["p50"] > 0
        assert row["device_peak_mib"] > 0
        assert row["parity"]["passed"] and not row["parity"]["extra"].get("reference")


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="openvino is not installed (pip install ubc[openvino])")
def test_openvino_profile_counts_the_models_multiply_accumulates(
        exported_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/openvino_profile.py: its MAC count of the ONNX graph is PyTorch's (a hook on
    every Conv2d), and it profiles the engine as the openvino backend compiles it."""
    import openvino as ov
    import torch

    from bench.openvino_profile import conv_macs, report
    from ubc.engine import load
    from ubc.model import model_from_bundle

    bundle = Bundle(exported_bundle)
    model = model_from_bundle(bundle).eval()
    counted: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: counted.append(
        m.weight.numel() * o.shape[2] * o.shape[3])) for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 1, *bundle.preprocessing.size))
    for hook in hooks:
        hook.remove()
    with load(bundle, backend="openvino", threads=1) as engine:
        macs = conv_macs(engine.read_model(ov.Core()))
        assert len(macs) == len(counted)
        assert sum(m for m, _ in macs.values()) == sum(counted)
        report(engine, batch=2, calls=1, slices_per_volume=100)
    out = capsys.readouterr().out
    assert "model.onnx at fp32, batch 2, 1 threads" in out
    assert f"{sum(counted) / 1e9:.2f} GMAC per slice" in out
