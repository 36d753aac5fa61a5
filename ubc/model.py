"""The UBC network and the paper's ResNet34 baseline.

Both return ``(class_logits [B, 2], mask_logits [B, 1, H, W] or None)`` so that training and
evaluation branch on the architecture in one place only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import segmentation_models_pytorch as smp
import torch
from torch import nn

if TYPE_CHECKING:
    from ubc.bundle import Bundle

ARCHITECTURES = ("ubc-resnet34", "resnet34")
NUM_CLASSES = 2


class UBC(nn.Module):
    """ResNet34 encoder + U-Net decoder (lesion mask) + classification head (HGG vs LGG).

    ``deep_supervision=True`` adds a 1x1 mask head on each of the four coarser decoder
    outputs (training only: ``forward_aux`` returns their logits; ``forward`` and the
    exported graph are unchanged, and ``inference_state_dict`` drops the extra heads).
    ``mask_channels=3``: sub-region masks (core, rim, oedema) as separate decoder channels,
    a training experiment (bundles and engines hold the one-channel model).
    """

    def __init__(self, deep_supervision: bool = False, mask_channels: int = 1) -> None:
        super().__init__()
        self.net = smp.Unet(
            "resnet34",
            encoder_weights=None,  # the paper trains from scratch; never touch a hub
            in_channels=1,
            classes=mask_channels,
            aux_params={"classes": NUM_CLASSES},
        )
        self._taps: list[torch.Tensor] = []
        self.aux_heads: nn.ModuleList | None = None
        if deep_supervision:
            blocks = list(self.net.decoder.blocks)[:-1]
            self.aux_heads = nn.ModuleList(
                nn.Conv2d(b.conv2[0].out_channels, mask_channels, kernel_size=1)
                for b in blocks)
            for block in blocks:
                block.register_forward_hook(lambda _m, _i, out: self._taps.append(out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._taps.clear()
        mask_logits, class_logits = self.net(x)
        self._taps.clear()
        return class_logits, mask_logits

    def forward_aux(self, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(class logits, mask logits, coarse mask logits per decoder level, coarse first)."""
        self._taps.clear()
        mask_logits, class_logits = self.net(x)
        taps, self._taps = self._taps, []
        aux: list[torch.Tensor] = []
        if self.aux_heads is not None:
            aux = [head(tap) for head, tap in zip(self.aux_heads, taps, strict=True)]
        return class_logits, mask_logits, aux


class ResNet34Classifier(nn.Module):
    """The paper's baseline: the same encoder, global average pooling, Linear(512, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = smp.encoders.get_encoder("resnet34", in_channels=1, weights=None)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.head(self.encoder(x)[-1]), None


def build_model(arch: str = "ubc-resnet34", *, deep_supervision: bool = False,
                mask_channels: int = 1) -> nn.Module:
    """A randomly initialised model of the named architecture (``ARCHITECTURES``).
    ``deep_supervision`` and ``mask_channels`` (UBC only): see ``UBC``."""
    if (deep_supervision or mask_channels != 1) and arch != "ubc-resnet34":
        raise ValueError(f"deep supervision and mask channels need a decoder; {arch!r} has none")
    if arch == "ubc-resnet34":
        return UBC(deep_supervision=deep_supervision, mask_channels=mask_channels)
    if arch == "resnet34":
        return ResNet34Classifier()
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def model_from_bundle(bundle: Bundle) -> nn.Module:
    """The eager PyTorch model with a bundle's weights, in eval mode on the CPU."""
    model = build_model(bundle.arch)
    model.load_state_dict(bundle.load_state_dict())
    return model.eval()


def inference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a bundle stores: training-only heads (deep supervision) removed, so
    the weights load into ``build_model(arch)``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("aux_heads.")}
