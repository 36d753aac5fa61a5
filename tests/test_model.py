"""The UBC network and the ResNet34 baseline: shapes, parameter counts, deep supervision."""

from __future__ import annotations

import pytest
import torch

from ubc.model import ARCHITECTURES, build_model, inference_state_dict


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_paper() -> None:
    net = build_model("ubc-resnet34").net
    assert round(_count(net.encoder) / 1e6, 1) == 21.3
    assert round(_count(net.decoder) / 1e6, 2) == 3.15
    assert _count(net.segmentation_head) == 145
    assert _count(net.classification_head) == 1026
    assert round(_count(net) / 1e6, 1) == 24.4
    baseline = build_model("resnet34")
    assert _count(baseline) == _count(net.encoder) + 1026  # same encoder + Linear(512, 2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_shapes(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch).eval()
    with torch.no_grad():
        class_logits, mask_logits = model(torch.randn(2, 1, 64, 64))
    assert class_logits.shape == (2, 2)
    if arch == "resnet34":
        assert mask_logits is None
    else:
        assert mask_logits.shape == (2, 1, 64, 64)


def test_no_pretrained_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_model tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    for arch in ARCHITECTURES:
        build_model(arch)


def test_deep_supervision_heads_are_training_only() -> None:
    torch.manual_seed(0)
    model = build_model("ubc-resnet34", deep_supervision=True).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        class_logits, mask_logits, aux = model.forward_aux(x)
        plain_out = model(x)
    assert [a.shape[-1] for a in aux] == [4, 8, 16, 32]
    assert torch.equal(plain_out[0], class_logits) and torch.equal(plain_out[1], mask_logits)
    plain = build_model("ubc-resnet34").eval()
    plain.load_state_dict(inference_state_dict(model))  # strict: no aux heads left over
    with torch.no_grad():
        assert torch.equal(plain(x)[1], mask_logits)


def test_bad_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="ubc-resnet34"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="decoder"):
        build_model("resnet34", deep_supervision=True)
