"""The C++ core's own test program, compiled and run without Python in the loop."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_builds_and_passes_without_python(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH")
    binary = tmp_path / "test_core"
    subprocess.run([compiler, "-std=c++17", "-O1", "-pthread", "-Wall", "-Wextra", "-Werror",
                    f"-I{ROOT / 'csrc' / 'core'}", str(ROOT / "csrc" / "tests" / "test_core.cpp"),
                    str(ROOT / "csrc" / "core" / "preprocess.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failure(s)" in result.stdout
