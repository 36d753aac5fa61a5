"""The package's layers (DESIGN.md): imports only point down, and the scoring path of an
ONNX bundle runs without torch or segmentation-models-pytorch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ubc"

# Each layer may import only the layers listed for it (and the shared bottom: errors, atomic).
_BOTTOM = {"errors", "atomic", "quiet", "_native"}
ALLOWED: dict[str, set[str]] = {
    "io": set(),
    "preprocess": set(),
    "preprocess_reference": set(),
    "bundle": set(),
    "devices": {"artifacts"},
    "artifacts": {"bundle"},
    "provenance": {"bundle", "io"},
    # the eager torch backend runs the model code itself (``ubc.model``, imported lazily)
    "engine": {"artifacts", "bundle", "cuda_memory", "devices", "model"},
    # writes artifacts; gating and timing them is parity's
    "export": {"artifacts", "bundle", "cuda_memory", "devices", "model"},
    # the caller hands in the slices (ubc.check_data, training side)
    "parity": {"artifacts", "bundle", "devices", "engine", "io", "preprocess", "metrics",
               "scoring"},
    "parity_timing": {"artifacts", "bundle", "devices", "engine", "parity", "scoring"},
    # the ubc-export run: export, then check, gate and time with parity
    "export_job": {"artifacts", "bundle", "devices", "engine", "export", "parity",
                   "parity_timing"},
    "scoring": {"artifacts", "bundle", "devices", "engine", "io", "preprocess", "provenance"},
    "serve": {"artifacts", "bundle", "devices", "engine", "io", "preprocess", "provenance",
              "scoring"},
    # a PACS as a source and a SEG destination (issue 29): above scoring and io
    "net": {"artifacts", "bundle", "devices", "engine", "io", "preprocess", "provenance",
            "scoring"},
}


def _layer(module: str) -> str:
    """``ubc.engine.registry`` -> ``engine``; ``ubc.io`` -> ``io``."""
    return module.split(".")[1] if module.count(".") else ""


def _imports(path: Path) -> set[str]:
    """The ``ubc.*`` modules a source file imports, at any depth (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ubc.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ubc":
                found |= {f"ubc.{a.name}" for a in node.names}
            elif node.module.startswith("ubc."):
                found.add(node.module)
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_only_point_down(layer: str) -> None:
    base = PACKAGE / layer
    files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    files = [f for f in files if f.is_file()]
    if not files:
        pytest.skip(f"ubc/{layer} does not exist yet")
    allowed = ALLOWED[layer] | _BOTTOM | {layer}
    wrong = sorted(f"{f.relative_to(PACKAGE)} imports {m}" for f in files
                   for m in _imports(f) if _layer(m) not in allowed)
    assert not wrong, "\n".join(wrong)


_SCORE_WITHOUT_TORCH = """
import json, sys
from ubc.scoring import score_archive, ScoringOptions
summary = score_archive(sys.argv[1], sys.argv[2], sys.argv[3], backend="onnxruntime",
                        device="cpu", options=ScoringOptions(batch_size=8))
heavy = sorted(m for m in ("torch", "segmentation_models_pytorch", "torchvision", "onnx",
                           "matplotlib") if m in sys.modules)
print(json.dumps({"heavy": heavy, "scored": summary.scored}))
"""


def test_scoring_an_onnx_bundle_imports_no_torch(exported_bundle: Path, phantom_archive: Path,
                                                 tmp_path: Path) -> None:
    from ubc.scoring import read_results

    out = tmp_path / "rows.csv"
    done = subprocess.run([sys.executable, "-c", _SCORE_WITHOUT_TORCH, str(exported_bundle),
                           str(phantom_archive), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"the scoring path imported {report['heavy']}"
    rows = read_results(out)
    assert len(rows) == 6 and all(r.status in ("ok", "no_lesion") for r in rows)
    assert {r.backend for r in rows} == {"onnxruntime"}
