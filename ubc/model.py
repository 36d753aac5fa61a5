"""The UBC network and the paper's ResNet34 baseline.

Both return ``(class_logits [B, 2], mask_logits [B, 1, H, W] or None)`` so that training and
evaluation branch on the architecture in one place only.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

ARCHITECTURES = ("ubc-resnet34", "resnet34")
NUM_CLASSES = 2


class UBC(nn.Module):
    """ResNet34 encoder + U-Net decoder (lesion mask) + classification head (HGG vs LGG)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = smp.Unet(
            "resnet34",
            encoder_weights=None,  # the paper trains from scratch; never touch a hub
            in_channels=1,
            classes=1,
            aux_params={"classes": NUM_CLASSES},
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask_logits, class_logits = self.net(x)
        return class_logits, mask_logits


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


def build_model(arch: str = "ubc-resnet34") -> nn.Module:
    """A randomly initialised model of the named architecture (``ARCHITECTURES``)."""
    if arch == "ubc-resnet34":
        return UBC()
    if arch == "resnet34":
        return ResNet34Classifier()
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
