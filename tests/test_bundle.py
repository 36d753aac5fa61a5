"""The bundle as deployed: readable by another account, named by its folder, usable when
read-only, and refused when its ONNX disagrees with its meta.json."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


# --- every engine checks the settings its artifact was made with (issue 26 item 4) -------

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
ENGINES = [
    pytest.param("torch", {"artifact": "torchscript"}, id="torchscript"),
    pytest.param("torch", {"artifact": "eager"}, id="eager"),
    pytest.param("onnxruntime", {}, id="onnxruntime"),
    pytest.param("openvino", {}, id="openvino", marks=pytest.mark.skipif(
        not HAS_OPENVINO, reason="openvino not installed (pip install ubc[openvino])")),
]


def _edited(bundle: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    """A copy of ``bundle`` whose meta.json was edited by hand (no tool updated anything)."""
    path = copy_bundle(bundle, tmp_path)
    meta = json.loads((path / META_FILE).read_text())
    edit(meta)
    (path / META_FILE).write_text(json.dumps(meta))
    return path


@pytest.mark.usefixtures("single_torch_thread")
@pytest.mark.parametrize(("backend", "options"), ENGINES)
@pytest.mark.parametrize("edit", [
    pytest.param(lambda m: m["preprocessing"].update(size=[128, 128]), id="size"),
    pytest.param(lambda m: m.update(class_names=["HGG", "LGG"]), id="class-names"),
])
def test_every_engine_refuses_settings_edited_after_training(
        exported_bundle: Path, tmp_path: Path, backend: str, options: dict[str, object],
        edit: Callable[[dict[str, Any]], object]) -> None:
    from ubc.engine import load

    path = _edited(exported_bundle, tmp_path, edit)
    with pytest.raises(BundleError, match=r"differs from meta.json's .* restore meta.json"):
        load(path, backend=backend, device="cpu", **options)


def test_edited_settings_are_not_baked_into_a_new_export(exported_bundle: Path,
                                                         tmp_path: Path) -> None:
    from ubc.export import export

    path = _edited(exported_bundle, tmp_path, lambda m: m["preprocessing"].update(norm="none"))
    with pytest.raises(BundleError, match=r"weights.pt: its ubc.preprocessing .* differs"):
        export(Bundle(path), ("onnx",))


@pytest.mark.usefixtures("single_torch_thread")
def test_torchscript_without_its_settings_is_refused(exported_bundle: Path,
                                                     tmp_path: Path) -> None:
    import torch

    from ubc.engine import load

    path = copy_bundle(exported_bundle, tmp_path)
    bundle = Bundle(path)
    model = torch.jit.load(str(path / "model.ts"))
    bundle.write_file("model.ts", lambda tmp: torch.jit.save(model, str(tmp)))  # no extra
    with pytest.raises(BundleError, match="model.ts: it carries no 'ubc.preprocessing'"):
        load(path, backend="torch", device="cpu")


def test_weights_that_do_not_fit_the_architecture_are_refused(exported_bundle: Path,
                                                              tmp_path: Path) -> None:
    from ubc.engine import load

    path = _edited(exported_bundle, tmp_path, lambda m: m.update(arch="resnet34"))
    with pytest.raises(BundleError, match=r"weights.pt: does not fit arch 'resnet34'"):
        load(path, backend="torch", artifact="eager", device="cpu")


def test_weights_saved_without_settings_still_load(engine_bundle: Path, tmp_path: Path) -> None:
    import torch

    from ubc.engine import load

    path = copy_bundle(engine_bundle, tmp_path)
    bundle = Bundle(path)
    plain = dict(bundle.load_state_dict())  # as a bundle made before the settings travelled
    bundle.write_file("weights.pt", lambda tmp: torch.save(plain, tmp))
    with load(path, backend="torch", device="cpu") as engine:
        assert engine.artifact == "weights.pt"


def test_missing_weights_are_named_where_eager_torch_needs_them(exported_bundle: Path,
                                                               tmp_path: Path) -> None:
    from ubc.engine import load

    path = copy_bundle(exported_bundle, tmp_path)
    (path / "weights.pt").unlink()  # an ONNX-only deployment
    with load(path, device="cpu") as engine:
        assert engine.backend == "onnxruntime"
    with pytest.raises(ValueError, match=r"has no weights.pt, which eager PyTorch runs .* "
                                         r"copy the whole bundle folder"):
        load(path, backend="torch", artifact="eager", device="cpu")


# --- meta.json: every field that is read is checked when the bundle opens ----------------

MALFORMED = [
    (lambda m: m.update(files=["weights.pt"]),
     "files must be a mapping of file name to sha256, got list"),
    (lambda m: m["files"].pop("weights.pt"), "files has no 'weights.pt' entry"),
    (lambda m: m["files"].update({"model.onnx": 12}), "model.onnx do not"),
    (lambda m: m.update(format_version=2),
     r"made by a newer ubc \(format_version 2 > 1\); upgrade ubc"),
    (lambda m: m.update(format_version="1"), "format_version must be a whole number"),
    (lambda m: m.update(top_k=0), "top_k must be a whole number >= 1"),
    (lambda m: m.update(top_k=2.5), "top_k must be a whole number >= 1"),
    (lambda m: m.update(class_names=[]), "class_names must be a list of two different"),
    (lambda m: m.update(class_names="LGG,HGG"), "class_names must be a list"),
    (lambda m: m.update(class_names=["HGG", "HGG"]), "class_names must be a list"),
    (lambda m: m.update(arch=""), "arch must be the architecture's name"),
    (lambda m: m.update(preprocessing=[64, 64]), "preprocessing must be a mapping"),
    (lambda m: m["preprocessing"].pop("norm"), "preprocessing lacks norm"),
    (lambda m: m["preprocessing"].update(size=[0, 0]), "preprocessing.size must be two"),
    (lambda m: m["preprocessing"].update(size=[100, 100]), "multiples of 32"),
    (lambda m: m["preprocessing"].update(size=[64]), "preprocessing.size must be a list of two"),
    (lambda m: m["preprocessing"].update(target_spacing=[0, 1]),
     "preprocessing.target_spacing must be two positive"),
    (lambda m: m["preprocessing"].update(norm="minmax"), "preprocessing.norm must be one of"),
    (lambda m: m.update(parity=[]), "parity must be a mapping, got list"),
    (lambda m: m.pop("top_k"), "missing top_k"),
]


@pytest.mark.parametrize(("edit", "message"), MALFORMED,
                         ids=[m.split(" ")[0] for _, m in MALFORMED])
def test_malformed_meta_json_field_is_named(engine_bundle: Path, tmp_path: Path,
                                            edit: Callable[[dict[str, Any]], object],
                                            message: str) -> None:
    path = _edited(engine_bundle, tmp_path, edit)
    with pytest.raises(BundleError, match=rf"meta.json: .*{message}"):
        Bundle(path)


def test_bundle_norms_are_the_preprocessing_norms() -> None:
    import ubc.bundle
    import ubc.preprocess

    assert ubc.bundle.NORMS == ubc.preprocess.NORMS


def test_a_bundle_that_cannot_score_stops_ubc_infer_at_start(
        engine_bundle: Path, tmp_path: Path, phantom_archive: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from ubc.cli.infer import main

    path = _edited(engine_bundle, tmp_path, lambda m: m.update(top_k=0))
    out = tmp_path / "rows.csv"
    assert main(["--model", str(path), "--input", str(phantom_archive), "--out", str(out),
                 "--backend", "torch", "--device", "cpu", "--quiet"]) == 2
    assert "top_k must be a whole number >= 1" in capsys.readouterr().err
    assert not out.exists()  # no error row per case


def test_a_bundle_that_cannot_score_keeps_ubc_serve_from_starting(engine_bundle: Path,
                                                                  tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    path = _edited(engine_bundle, tmp_path, lambda m: m.update(class_names=[]))
    done = subprocess.run([sys.executable, "-m", "ubc.cli.serve", "--model", str(path),
                           "--port", "0", "--backend", "torch", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "class_names must be a list of two different names" in done.stderr
