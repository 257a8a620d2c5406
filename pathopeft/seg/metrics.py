"""Losses, per-image metrics (MONAI) and whole-image inference shared by training and ``predict``.

Metrics are computed per image and per foreground class with MONAI (Dice, IoU, 95th-percentile
Hausdorff distance), then averaged over classes (ignoring undefined ones) and over images.
Conventions, stated because papers differ:

* ``dice`` / ``iou`` count every image: where the ground truth lacks a class, an empty
  prediction scores 1 and any predicted pixel scores 0 (MONAI ``ignore_empty=False``). This is
  the score that picks checkpoints and learning rates: with ``ignore_empty=True`` an image with
  only false positives scored NaN and was dropped, so over-segmenting empty images cost nothing;
* ``fp_image_rate``: of the images whose ground truth lacks a class, the share with any pixel
  predicted as that class (NaN when no image lacks it);
* ``dice_nonempty``: Dice over images that hold the class only (``ignore_empty=True``, the
  convention of many papers), reported for comparison;
* HD95 is in pixels at the working scale; when exactly one of prediction and ground truth is empty
  for a class, HD95 is the image diagonal (the worst possible), not "undefined" — otherwise a model
  that predicts nothing would look good on HD95; when both are empty it is undefined.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceFocalLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from torch import nn

from pathopeft.config.segment import SegLossConfig

__all__ = ["METRICS", "build_loss", "image_scores", "predict_logits", "summarise_scores"]

METRICS = ("dice", "iou", "hd95", "fp_image_rate", "dice_nonempty")


def build_loss(cfg: SegLossConfig) -> nn.Module:
    """MONAI Dice + CE or Dice + focal on softmax probabilities; targets are class indices."""
    if cfg.name == "dice_ce":
        return DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            include_background=cfg.include_background,
            lambda_dice=cfg.lambda_dice,
            lambda_ce=cfg.lambda_other,
        )
    return DiceFocalLoss(
        to_onehot_y=True,
        softmax=True,
        include_background=cfg.include_background,
        lambda_dice=cfg.lambda_dice,
        lambda_focal=cfg.lambda_other,
        gamma=cfg.focal_gamma,
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    *,
    mode: str,
    img_size: int,
    overlap: float = 0.25,
    sw_batch_size: int = 8,
) -> torch.Tensor:
    """Logits at the image's own size: sliding window (Gaussian-weighted overlaps) or resize."""
    if mode == "tile":
        logits = sliding_window_inference(
            image,
            roi_size=(img_size, img_size),
            sw_batch_size=sw_batch_size,
            predictor=model,
            overlap=overlap,
            mode="gaussian",
        )
        return logits.float()
    size = tuple(image.shape[-2:])
    small = F.interpolate(image, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return F.interpolate(model(small).float(), size=size, mode="bilinear", align_corners=False)


def _one_hot(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(classes.long(), num_classes).permute(0, 3, 1, 2).float()


@torch.no_grad()
def image_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image and foreground class: ``(B, len(METRICS), C-1)`` in :data:`METRICS` order
    (NaN = undefined)."""
    num_classes = logits.shape[1]
    pred = _one_hot(logits.argmax(1), num_classes)
    truth = _one_hot(target[:, 0], num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(pred, truth)
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(pred, truth)
    with warnings.catch_warnings():  # MONAI's HD metric calls its own deprecated argument internally
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        # empty prediction / ground truth: handled below by this module's stated convention
        warnings.filterwarnings(
            "ignore", message="the (prediction|ground truth) of class", category=UserWarning
        )
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(pred, truth)
    hd95 = hd95.to(dice.device, dice.dtype)
    has_pred = pred[:, 1:].flatten(2).any(-1)
    has_truth = truth[:, 1:].flatten(2).any(-1)
    diagonal = math.hypot(*logits.shape[-2:])
    hd95 = torch.where(has_pred ^ has_truth, torch.full_like(hd95, diagonal), hd95)
    hd95 = torch.where(~has_pred & ~has_truth, torch.full_like(hd95, float("nan")), hd95)
    nan = torch.full_like(dice, float("nan"))
    has_pred, has_truth = has_pred.to(dice.device), has_truth.to(dice.device)
    false_positive_image = torch.where(has_truth, nan, has_pred.to(dice.dtype))
    dice_nonempty = torch.where(has_truth, dice, nan)
    return torch.stack([dice, iou, hd95, false_positive_image, dice_nonempty], dim=1)


def summarise_scores(scores: torch.Tensor) -> dict[str, float | list[float]]:
    """``(N, len(METRICS), C-1)`` per-image scores → dataset means and per-class means."""
    out: dict[str, float | list[float]] = {}
    if scores.numel() == 0:
        return {name: float("nan") for name in METRICS}
    for index, name in enumerate(METRICS):
        per_image = _nanmean(scores[:, index], dim=1)
        out[name] = float(_nanmean(per_image, dim=0))
        if scores.shape[-1] > 1:
            out[f"{name}_per_class"] = [float(v) for v in _nanmean(scores[:, index], dim=0)]
    out["n_images"] = int(scores.shape[0])
    return out


def _nanmean(values: torch.Tensor, dim: int) -> torch.Tensor:
    finite = ~torch.isnan(values)
    total = torch.where(finite, values, torch.zeros_like(values)).sum(dim)
    count = finite.sum(dim)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
