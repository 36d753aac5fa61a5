"""ubc-infer on Ray (``ubc.scoring.ray_runner``), with a real Ray: rows equal the single-process
run's, resume is the same, and on a two-node cluster on this machine a killed engine actor and
a killed driver still leave every case in the results exactly once."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scoring_archive import PHANTOM_SHAPE

import ubc
from ubc.cli.infer import main
from ubc.scoring import ScoringOptions, discover_cases, read_results, safe_name, score_archive

ray = pytest.importorskip("ray")

REPO = Path(ubc.__file__).resolve().parents[1]
OBJECT_STORE = 150 * 2 ** 20  # bytes per node: the tests move a few MB


def _args(bundle: Path, source: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(bundle), "--input", str(source), "--out", str(out),
            "--backend", "torch", "--device", "cpu", "--quiet", *extra]


def test_plain_scoring_does_not_import_ray() -> None:
    code = "import sys, ubc.scoring, ubc.cli.infer; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=_env()).returncode == 0


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False,
             log_to_driver=False, configure_logging=True, logging_level=logging.ERROR)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_rows_equal_the_single_process_run(tmp_path: Path, tiny_bundle: Path,
                                               mixed_archive, local_ray) -> None:
    from ubc.scoring.ray_runner import score_archive_ray

    root, bad = mixed_archive
    options = ScoringOptions(min_lesion_ml=0.0)  # every good case "ok", with a P(HGG)
    runs = {}
    for name, run in (("single", score_archive), ("ray", score_archive_ray)):
        folder = tmp_path / name
        summary = run(tiny_bundle, root, folder / "results.csv", masks=folder / "masks",
                      overlays=folder / "overlays", backend="torch", device="cpu",
                      options=options)
        assert summary.scored == summary.cases == 7 + len(bad)
        runs[name] = {r.case_id: r for r in read_results(folder / "results.csv")}
    single, on_ray = runs["single"], runs["ray"]
    assert sorted(single) == sorted(on_ray)  # each case once
    assert {i for i, r in on_ray.items() if r.status == "error"} == set(bad)
    for case_id, want in single.items():
        got = on_ray[case_id]
        assert (got.status, got.error, got.slices_used, got.slices_scored, got.backend,
                got.input_bytes, got.input_mtime_ns) == \
            (want.status, want.error, want.slices_used, want.slices_scored, want.backend,
             want.input_bytes, want.input_mtime_ns)
        if want.status == "error":
            continue
        assert got.p_hgg == pytest.approx(want.p_hgg, abs=1e-6)
        assert got.lesion_volume_ml == pytest.approx(want.lesion_volume_ml, rel=1e-6)
        for kind, suffix in (("masks", ".nii.gz"), ("overlays", ".png")):
            name = safe_name(case_id) + suffix
            assert (tmp_path / "ray" / kind / name).read_bytes() == \
                (tmp_path / "single" / kind / name).read_bytes(), (case_id, kind)
    # resume through the CLI: the same file, nothing left to score, failures still reported
    out = tmp_path / "ray" / "results.csv"
    before = out.read_bytes()
    assert main(_args(tiny_bundle, root, out, "--ray", "--min-lesion-ml", "0")) == 1
    assert out.read_bytes() == before


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}


def _rows_written(path: Path) -> int:
    try:
        return max(path.read_bytes().count(b"\n") - 1, 0)  # minus the header
    except FileNotFoundError:
        return 0


def _wait_rows(path: Path, rows: int, process: subprocess.Popen[bytes], seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while _rows_written(path) < rows and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    return _rows_written(path)


def _engine_actor_pids(cluster) -> list[int]:
    """Processes of engine actors under this cluster's raylets (never anyone else's)."""
    import psutil

    pids = []
    for node in cluster.list_all_nodes():
        for info in node.all_processes.get("raylet", []):
            for child in psutil.Process(info.process.pid).children(recursive=True):
                try:
                    title = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if "EngineActor" in title:
                    pids.append(child.pid)
    return pids


@pytest.mark.slow
def test_two_nodes_survive_a_killed_actor_and_a_killed_driver(tmp_path: Path,
                                                              tiny_bundle: Path) -> None:
    from ray.cluster_utils import Cluster

    from ubc.synth import write_archive

    root = write_archive(tmp_path / "archive", 40, seed=7, shape=PHANTOM_SHAPE)
    expected = sorted(c.case_id for c in discover_cases(root))
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, object_store_memory=OBJECT_STORE, include_dashboard=False))
    try:
        cluster.add_node(num_cpus=2, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        out = tmp_path / "results.csv"
        command = [sys.executable, "-m", "ubc.cli.infer", *_args(
            tiny_bundle, root, out, "--ray", cluster.address, "--batch-size", "1",
            "--masks", str(tmp_path / "masks"))]
        driver = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        try:
            assert _wait_rows(out, 4, driver, 240) >= 4, driver.stderr
            actors = _engine_actor_pids(cluster)
            assert actors, "no engine actor process found"
            for pid in actors:
                os.kill(pid, signal.SIGKILL)
            killed_at = _rows_written(out)
            # Ray restarts the actor and retries its calls: the run goes on
            assert _wait_rows(out, killed_at + 8, driver, 240) >= killed_at + 8
            driver.send_signal(signal.SIGKILL)
            driver.communicate(timeout=30)
        finally:
            if driver.poll() is None:
                driver.kill()
        assert driver.returncode == -signal.SIGKILL
        done_before = _rows_written(out)
        assert done_before < len(expected), "the driver must be killed mid-run"
        rerun = subprocess.run(command, env=_env(), capture_output=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    finally:
        cluster.shutdown()
    rows = read_results(out)
    print(f"actor killed at {killed_at} rows, driver killed at {done_before} of "
          f"{len(expected)}; after the re-run {len(rows)} rows")  # figures for the notes
    assert sorted(r.case_id for r in rows) == expected  # every case exactly once
    assert all(r.status != "error" for r in rows), [r.error for r in rows if r.error]
    masks = [p for p in (tmp_path / "masks").iterdir() if not p.name.startswith(".")]
    assert len(masks) == len(expected)  # (a write torn by SIGKILL leaves a hidden .tmp)
