"""The paper's loss: L = a * CE(class) + (1 - a) * SoftDice(mask), and its parts.

Rows without a grade (label -1) add no classification term and rows without a mask add no
Dice term, in the same batch: this is how mask-only patients (unknown diagnosis, the
authors' proposed extension) train the encoder through the decoder alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossParts", "soft_dice", "soft_dice_loss", "classification_loss", "ubc_loss"]

DICE_EPS = 1.0


@dataclass(frozen=True)
class LossParts:
    """The total loss (a tensor with grad) and its detached parts as floats."""

    total: torch.Tensor
    ce: float
    dice: float


def soft_dice(probs: torch.Tensor, target: torch.Tensor, eps: float = DICE_EPS) -> torch.Tensor:
    """Soft Dice per sample [B] of probabilities and a binary target, both [B, 1, H, W]:
    ``(2 * sum(p * m) + eps) / (sum(p) + sum(m) + eps)``.

    The paper prints ``2 * (sum(p*m) + eps) / (sum(p + m) + eps)``, which exceeds 1 (loss
    -1) on an empty mask with an empty prediction; eps outside the factor 2 keeps a perfect
    prediction at exactly 1 (loss 0) for empty and non-empty masks alike.
    """
    dims = tuple(range(1, probs.ndim))
    target = target.to(probs.dtype)
    intersection = (probs * target).sum(dims)
    return (2.0 * intersection + eps) / (probs.sum(dims) + target.sum(dims) + eps)


def soft_dice_loss(mask_logits: torch.Tensor, target: torch.Tensor,
                   has_mask: torch.Tensor | None = None, eps: float = DICE_EPS) -> torch.Tensor:
    """Mean ``1 - soft_dice`` over the rows with a mask (0, with grad, if there are none);
    with several mask channels (sub-regions), Dice per channel, averaged over channels."""
    rows, channels = mask_logits.shape[:2]
    probs = torch.sigmoid(mask_logits).reshape(rows * channels, 1, *mask_logits.shape[2:])
    per_channel = soft_dice(probs, target.reshape(probs.shape), eps).reshape(rows, channels)
    loss = 1.0 - per_channel.mean(1)
    if has_mask is None:
        return loss.mean()
    weights = has_mask.to(loss.dtype)
    return (loss * weights).sum() / weights.sum().clamp_min(1.0)


def classification_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over rows with a grade (labels >= 0); 0 with grad if none."""
    known = labels >= 0
    if not bool(known.any()):
        return class_logits.sum() * 0.0
    return F.cross_entropy(class_logits[known], labels[known])


def ubc_loss(class_logits: torch.Tensor, mask_logits: torch.Tensor | None, labels: torch.Tensor,
             masks: torch.Tensor, has_mask: torch.Tensor, *, alpha: float = 0.5,
             aux_mask_logits: list[torch.Tensor] | None = None) -> LossParts:
    """``alpha * CE + (1 - alpha) * SoftDice`` (CE alone when ``mask_logits`` is None, the
    baseline). ``aux_mask_logits``: coarser decoder outputs (deep supervision), each scored
    against the mask resized to its grid (nearest) and averaged into the Dice term."""
    ce = classification_loss(class_logits, labels)
    if mask_logits is None:
        return LossParts(ce, float(ce.detach()), 0.0)
    dice = soft_dice_loss(mask_logits, masks, has_mask)
    if aux_mask_logits:
        terms = [dice] + [soft_dice_loss(aux, F.interpolate(masks.float(), size=aux.shape[-2:],
                                                            mode="nearest"), has_mask)
                          for aux in aux_mask_logits]
        dice = torch.stack(terms).mean()
    total = alpha * ce + (1.0 - alpha) * dice
    return LossParts(total, float(ce.detach()), float(dice.detach()))
