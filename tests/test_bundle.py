"""The bundle as deployed: readable by another account, named by its folder, usable when
read-only, and refused when its ONNX disagrees with its meta.json."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_bundle

from ubc.bundle import META_FILE, Bundle
from ubc.errors import BundleError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bundle_files_are_readable_by_other_accounts(exported_bundle: Path) -> None:
    assert _mode(exported_bundle) == 0o755
    for path in exported_bundle.iterdir():
        assert _mode(path) == 0o644, path.name


def test_bundle_is_named_by_its_final_folder(exported_bundle: Path, tmp_path: Path) -> None:
    partial = tmp_path / ".staging-7e4b57e96b.ubc.partial"
    shutil.copytree(exported_bundle, partial)
    final = tmp_path / "glioma-v2.ubc"
    os.replace(partial, final)
    assert Bundle(final).name == "glioma-v2"
    assert "name" not in json.loads((final / META_FILE).read_text())


@pytest.fixture
def read_only_bundle(exported_bundle: Path, tmp_path: Path) -> Iterator[Path]:
    path = copy_bundle(exported_bundle, tmp_path)
    for item in [path, *path.iterdir()]:
        item.chmod(0o555 if item.is_dir() else 0o444)
    yield path
    for item in [path, *path.iterdir()]:
        item.chmod(0o755 if item.is_dir() else 0o644)


def test_read_only_bundle_loads_measures_and_scores(read_only_bundle: Path,
                                                    engine_slices: np.ndarray,
                                                    phantom_archive: Path) -> None:
    from ubc.parity import compare
    from ubc.scoring import Scorer

    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in read_only_bundle.iterdir()}
    result = compare(read_only_bundle, "onnxruntime", engine_slices, threads=1)
    assert result.passed, result.failures
    volume = sorted(phantom_archive.glob("*/*/*_flair.nii.gz"))[0]
    with Scorer(read_only_bundle, backend="onnxruntime", device="cpu") as scorer:
        row = scorer.score(volume)
    assert row.status in ("ok", "no_lesion") and row.model == "engine"
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in read_only_bundle.iterdir()}
    assert after == before  # measuring parity wrote nothing (root could have written)


def test_onnx_that_disagrees_with_meta_json_is_refused(exported_bundle: Path,
                                                       tmp_path: Path) -> None:
    from ubc.engine import load

    path = copy_bundle(exported_bundle, tmp_path)
    meta = json.loads((path / META_FILE).read_text())
    meta["preprocessing"]["norm"] = "percentile"  # as if meta.json were edited by hand
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="ubc.preprocessing .* differs from meta.json"):
        load(path, backend="onnxruntime", device="cpu")
