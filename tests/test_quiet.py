"""Quiet logs on success (issue 27, ``ubc.quiet``): a successful export, scoring run and Ray
run print no warning or error line; ``-v`` shows the third-party warnings again."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ubc

REPO = Path(ubc.__file__).resolve().parents[1]
# a warning or an error line: Python's ("FutureWarning:", "ValueError"), logging's
# ("WARNING name: ..."), glog's ("W1207 12:00:00 ...") or a C++ log line ("x.cc:12: ..."),
# not the summary's "error 0"
_NOISE = re.compile(r"(Warning|Error)\b|\b(WARNING|ERROR|CRITICAL)\b|^[WEF]\d{4} "
                    r"|\.cc:\d+|\berror:", re.MULTILINE)


def _run(module: str, *args: object) -> str:
    """``python -m module args`` (checked: exit 0); its stdout and stderr together."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if _NOISE.search(line)]


def _infer(bundle: Path, archive: Path, out: Path, *extra: str) -> str:
    return _run("ubc.cli.infer", "--model", bundle, "--input", archive, "--out", out,
                "--device", "cpu", *extra)


def test_scoring_runs_are_quiet_and_v_shows_why(tmp_path: Path,
                                                        exported_bundle: Path,
                                                        phantom_archive: Path) -> None:
    for backend in ("auto", "torch"):  # ONNX Runtime; TorchScript (torch.jit deprecations)
        output = _infer(exported_bundle, phantom_archive, tmp_path / f"{backend}.csv",
                        "--backend", backend)
        assert "6 cases: " in output and _noise(output) == [], output
    verbose = _infer(exported_bundle, phantom_archive, tmp_path / "v.csv", "--backend",
                     "torch", "-v")
    assert "`torch.jit.load` is deprecated" in verbose


@pytest.mark.slow
def test_a_successful_export_is_quiet(tmp_path: Path, engine_bundle: Path) -> None:
    bundle = Path(shutil.copytree(engine_bundle, tmp_path / "engine.ubc"))
    output = _run("ubc.cli.export", bundle)  # TorchScript, ONNX, parity check
    assert "model.onnx" in output and _noise(output) == [], output
    output = _run("ubc.cli.export", bundle, "--cpu", "--timing-seconds", "0.2")
    assert "INT8 calibration" in output and _noise(output) == [], output


@pytest.mark.slow
def test_a_ray_run_is_quiet(tmp_path: Path, tiny_bundle: Path,
                                     phantom_archive: Path) -> None:
    pytest.importorskip("ray")
    output = _infer(tiny_bundle, phantom_archive, tmp_path / "r.csv", "--backend", "torch",
                    "--ray", "local", "--actors", "1,1")
    assert "6 cases: " in output and _noise(output) == [], output
