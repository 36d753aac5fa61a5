"""The fuzz harness (tests/fuzz): seeds and regression files replay cleanly through each
target, the seed corpus is what its generator writes, findings are recorded, and (slow) a
short fuzzing run finds nothing."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz import run, seeds

ROOT = Path(__file__).resolve().parents[1]


TARGETS = sorted(p.stem.removeprefix("target_") for p in Path(run.__file__).parent.glob(
    "target_*.py"))


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_and_regressions_replay_cleanly_through_each_target(target: str) -> None:
    module = run.target_module(target)
    assert list(module.SEEDS.iterdir()), f"{target} has no seeds in {module.SEEDS}"
    assert run.replay(target) == {}


def test_nifti_seeds_cover_every_dtype_and_the_findings() -> None:
    names = {p.name for p in seeds.NIFTI_CORPUS.iterdir()}
    assert {f"{dtype}.nii" for dtype in seeds.DTYPES} <= names and len(names) >= 25
    assert len(list(run.target_module("nifti").REGRESSIONS.glob("*.nii*"))) >= 5


def inflated(raw: bytes) -> bytes:
    """Compare content, not compressed bytes (another zlib may compress differently)."""
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def test_checked_in_seed_corpus_is_what_the_generator_writes() -> None:
    expected = {name: inflated(raw) for name, raw in seeds.nifti_seeds().items()}
    files = list(seeds.NIFTI_CORPUS.iterdir())
    assert sum(p.stat().st_size for p in files) < 64 * 1024  # small files only
    stored = {p.name: inflated(p.read_bytes()) for p in files}
    if not seeds.REAL_FLAIR.is_file():  # the real crop is made only where the data exists
        stored.pop("brats_flair_crop.nii.gz", None)
    assert stored == expected


def test_an_unexpected_exception_is_recorded_once_and_fuzzing_goes_on(tmp_path: Path) -> None:
    def target(data: bytes) -> None:
        if data.startswith(b"bad"):
            {}[data]  # KeyError: what a target does not allow

    guarded = run.guarded(target, tmp_path)
    for data in (b"good", b"bad1", b"bad2", b"fine"):
        guarded(data)  # does not raise
    recorded = sorted(p.name for p in tmp_path.iterdir())
    assert len(recorded) == 2 and recorded[0].startswith("KeyError-")  # one .bin + one .txt
    assert (tmp_path / recorded[0]).read_bytes() == b"bad1"
    assert run.replay("nifti", [tmp_path / recorded[0]]) == {}  # no NIfTI: refused, fine


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_a_short_fuzzing_run_finds_nothing(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tests.fuzz.run", "nifti", "--seconds", "20",
                             "--work", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert result.returncode == 0, (summary, result.stderr[-3000:])
    assert summary["executions"] > 100 and not summary["findings"] and not summary["crashes"]
