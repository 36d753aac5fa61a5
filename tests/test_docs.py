"""What a new user reads first (issue 27): the README's commands and install lines as they
work from a clone, and the reason a skipped test gives."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import ubc

REPO = Path(ubc.__file__).resolve().parents[1]
DOCS = ("README.md", "train/README.md", "bench/RAY_SIZING.md")


def test_readme_starts_with_the_demo_and_the_tests() -> None:
    first_block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```")[0]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == [
        "pip install -e '.[dev]' && ubc-demo", "pip install -e '.[dev]' && python -m pytest -q"]


def test_install_lines_work_from_a_clone_and_in_zsh() -> None:
    for doc in DOCS:
        lines = re.findall(r"pip install [^`\n]*", (REPO / doc).read_text())
        assert lines, doc
        for line in lines:
            assert not line.startswith("pip install ubc"), (doc, line)  # not on any index
            for extra in re.findall(r"[^\s(]*\[[^\]]*\]'?", line):
                assert re.fullmatch(r"'\.\[[a-z,]+\]'", extra), (doc, line)  # quoted, local


def test_readme_names_the_scoring_only_install_near_the_top() -> None:
    top = (REPO / "README.md").read_text().split("\n## ", 1)[0]
    assert "`pip install -e .`" in top and "218 MB" in top and "no PyTorch" in top
    assert "7 GB" in top and "idle" in top and "16 min" in top


def test_a_real_data_skip_says_how_to_enable_it(tmp_path: Path) -> None:
    env = {**os.environ, "UBC_REAL_DATA": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         str(REPO / "tests" / "test_io.py"), "-k", "real_volumes"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:]
    assert f"real MRI volumes not in {tmp_path}" in run.stdout
    assert "set UBC_REAL_DATA to a folder holding them" in run.stdout
    assert "BrainLesion/tutorials" in run.stdout
