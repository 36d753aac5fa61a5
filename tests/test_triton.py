"""ubc-export --triton: the model repository's config.pbtxt parses as protobuf text (with
Triton's own ModelConfig grammar when tritonclient is installed, and always with a small
text-format reader) and agrees with the ONNX graph, which runs at max_batch_size."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ubc.bundle import Bundle
from ubc.cli import export as export_cli

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"]+))')


def parse_text_proto(text: str) -> dict[str, list[Any]]:
    """A protobuf text-format message as {field: [values]} (nested messages as dicts).
    Refuses anything outside the grammar (unbalanced braces, a field without a value)."""
    tokens = [m.group(2) or m.group(3) or m.group(4) for m in _TOKEN.finditer(text)
              if not m.group(1)]
    assert "".join(_TOKEN.sub("", text).split()) == "", "characters outside the grammar"
    position = 0

    def value() -> Any:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "{":
            return message("}")
        if token == "[":
            items = []
            while tokens[position] != "]":
                items.append(value())
                if tokens[position] == ",":
                    position += 1
            position += 1
            return items
        assert token not in "}]:,", f"unexpected {token!r}"
        if token.startswith('"'):
            return token[1:-1]
        return int(token) if re.fullmatch(r"-?\d+", token) else token

    def message(end: str | None) -> dict[str, list[Any]]:
        nonlocal position
        fields: dict[str, list[Any]] = {}
        while position < len(tokens) and tokens[position] != end:
            name = tokens[position]
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), f"bad field name {name!r}"
            position += 1
            if tokens[position] == ":":
                position += 1
            got = value()
            fields.setdefault(name, []).extend(got if isinstance(got, list) else [got])
        if end is not None:
            assert tokens[position] == end, "unbalanced braces"
            position += 1
        return fields

    parsed = message(None)
    assert position == len(tokens)
    return parsed


def _triton_model_config() -> Any:
    """tritonclient's generated ModelConfig (loaded by file: its grpc package needs grpcio,
    which this check does not)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed (pip install tritonclient)")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("_triton_model_config", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelConfig


@pytest.fixture(scope="module")
def repo(exported_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "models"
    assert export_cli.main([str(exported_bundle), "--triton", str(out), "--max-batch",
                            "8"]) == 0
    return out


def test_repository_layout_and_config_agree_with_the_onnx_graph(repo: Path,
                                                                exported_bundle: Path) -> None:
    import onnxruntime as ort

    name = Bundle(exported_bundle).name
    assert sorted(p.name for p in repo.iterdir()) == ["README.md", name]
    config = parse_text_proto((repo / name / "config.pbtxt").read_text())
    assert config["name"] == [name] and config["platform"] == ["onnxruntime_onnx"]
    assert config["max_batch_size"] == [8]
    batching = config["dynamic_batching"][0]
    assert batching["preferred_batch_size"] == [4, 8]
    assert batching["max_queue_delay_microseconds"] == [5000]
    assert config["instance_group"] == [{"count": [1], "kind": ["KIND_AUTO"]}]
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for kind, graph in (("input", session.get_inputs()), ("output", session.get_outputs())):
        declared = {t["name"][0]: t for t in config[kind]}
        assert sorted(declared) == sorted(t.name for t in graph)
        for tensor in graph:
            dims = [d if isinstance(d, int) else -1 for d in tensor.shape[1:]]
            assert declared[tensor.name]["dims"] == dims
            assert declared[tensor.name]["data_type"] == ["TYPE_FP32"] == [
                "TYPE_FP32" if tensor.type == "tensor(float)" else tensor.type]
    # the packaged model runs a full batch and answers the declared shapes
    batch = np.zeros((8, *config["input"][0]["dims"]), np.float32)
    outputs = session.run(None, {session.get_inputs()[0].name: batch})
    for tensor, array in zip(session.get_outputs(), outputs, strict=True):
        assert list(array.shape) == [8, *{t["name"][0]: t for t in config["output"]}[
            tensor.name]["dims"]]
    readme = (repo / "README.md").read_text()
    assert "ubc.preprocess" in readme and "64 x 64" in readme


def test_config_parses_with_tritons_model_config(repo: Path, exported_bundle: Path) -> None:
    from google.protobuf import text_format

    model_config = _triton_model_config()
    name = Bundle(exported_bundle).name
    parsed = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config())
    assert parsed.max_batch_size == 8 and parsed.platform == "onnxruntime_onnx"
    assert [i.name for i in parsed.input] == ["image"]
    assert list(parsed.input[0].dims) == [1, 64, 64]
    assert {o.name: list(o.dims) for o in parsed.output} == {
        "class_logits": [2], "mask_logits": [1, 64, 64]}
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8]


def test_the_small_parser_refuses_broken_text() -> None:
    assert parse_text_proto('a: 1 b { c: "x" } d: [1, 2]') == {
        "a": [1], "b": [{"c": ["x"]}], "d": [1, 2]}
    for broken in ("a: 1 b { c: 2", "a: }", "{ a: 1 }", 'a: "x" ;'):
        with pytest.raises((AssertionError, IndexError)):
            parse_text_proto(broken)
