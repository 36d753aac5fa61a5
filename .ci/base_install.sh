#!/usr/bin/env bash
# The deployable core alone: `pip install ubc` (no extras) into a fresh virtual environment
# must score an ONNX bundle with ubc-infer, without torch. The bundle and the archive are
# made with the development install (the first argument: its python).
set -euo pipefail
dev_python=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$(dirname "$0")/.."

"$dev_python" - "$work/model.ubc" <<'PY'
import sys

import torch

from ubc.bundle import Preprocessing, create_bundle
from ubc.export import export
from ubc.model import build_model

torch.manual_seed(0)
bundle = create_bundle(sys.argv[1], arch="ubc-resnet34", state_dict=build_model().state_dict(),
                       preprocessing=Preprocessing(size=(32, 32), target_spacing=(2.0, 2.0)))
export(bundle, ("onnx",))
PY
"$dev_python" -m ubc.cli.synth "$work/archive" --cases 2 --shape 64 64 24 >/dev/null

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
start=$SECONDS
"$work/venv/bin/python" -m pip install -q .
echo "CI: base install took $((SECONDS - start)) s, $(du -sm "$work/venv" | cut -f1) MB"
if "$work/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "CI: the base install pulled in torch" >&2
  exit 1
fi
"$work/venv/bin/ubc-infer" --model "$work/model.ubc" --input "$work/archive" \
  --out "$work/rows.csv" --backend onnxruntime --quiet
rows=$(($(wc -l < "$work/rows.csv") - 1))
[ "$rows" -eq 2 ] || { echo "CI: expected 2 rows, got $rows" >&2; exit 1; }
echo "CI: base install scored $rows cases with ubc-infer (no torch)"
