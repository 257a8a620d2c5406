"""Bag- and tile-level evaluation metrics (torchmetrics, so they sync across DDP ranks).

Bag level (METHODS.md, CoMEL "Published setup"): accuracy, balanced accuracy (macro recall), macro
AUC (one-vs-rest, averaged over classes; for two classes it equals the binary AUC) and macro F1.

Tile level, where tile labels exist (METHODS.md, "Evaluation conventions"): instance AUC over all
labelled tiles of the evaluated slides pooled (``cat`` states, gathered across ranks before the
AUC is computed), tile accuracy and F1 at ``threshold`` on the min–max scores, and per-slide tile
Dice and IoU (a tile is predicted tumour when its score ≥ ``threshold``), averaged over the slides
that contain at least one tumour tile: min–max scores put a 1 in every slide, so on a tumour-free
slide the overlap is 0 by construction and would only measure the normalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassRecall,
)

__all__ = ["BagMetrics", "InstanceMetrics", "TileOverlap", "bag_metrics", "best_threshold"]


def bag_metrics(num_classes: int) -> MetricCollection:
    """Bag accuracy, balanced accuracy, macro AUC and macro F1; update with (probs (B,C), labels (B,))."""
    return MetricCollection(
        {
            "bag_accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "bag_balanced_accuracy": MulticlassRecall(num_classes, average="macro"),
            "bag_auc": MulticlassAUROC(num_classes, average="macro"),
            "bag_f1": MulticlassF1Score(num_classes, average="macro"),
        },
        compute_groups=False,
    )


class ClassCounts(Metric):
    """How many bags of each class were seen (an AUC needs every class present)."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("counts", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, labels: Tensor) -> None:
        self.counts += torch.bincount(labels.long(), minlength=self.num_classes)

    def compute(self) -> Tensor:
        return self.counts


class BagMetrics(nn.Module):
    """Bag metrics of a split; ``bag_auc`` is NaN (undefined) when a class has no bag in the split."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.metrics = bag_metrics(num_classes)
        self.counts = ClassCounts(num_classes)

    def update(self, probs: Tensor, labels: Tensor) -> None:
        self.metrics.update(probs, labels)
        self.counts.update(labels)

    def compute(self) -> dict[str, Tensor]:
        out = dict(self.metrics.compute())
        if bool((self.counts.compute() == 0).any()):
            out["bag_auc"] = torch.tensor(float("nan"), device=out["bag_auc"].device)
        return out

    def reset(self) -> None:
        self.metrics.reset()
        self.counts.reset()


class TileOverlap(Metric):
    """Per-slide tile Dice and IoU, averaged over slides with ≥ 1 tumour tile."""

    full_state_update = False

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        self.add_state("dice_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("slides", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor, labels: Tensor) -> None:  # one slide's tiles
        target = labels.bool()
        if not bool(target.any()):
            return
        pred = scores >= self.threshold
        inter = (pred & target).sum().double()
        dice = 2 * inter / (pred.sum() + target.sum()).double()
        iou = inter / (pred | target).sum().double()
        self.dice_sum += dice
        self.iou_sum += iou
        self.slides += 1

    def compute(self) -> dict[str, Tensor]:
        n = self.slides.clamp_min(1).double()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.dice_sum.device)
        if int(self.slides) == 0:
            return {"tile_dice": nan, "tile_iou": nan}
        return {"tile_dice": self.dice_sum / n, "tile_iou": self.iou_sum / n}


class InstanceMetrics(nn.Module):
    """Tile-level metrics over a split; slides without tile labels (label −1) are ignored.

    ``instance_auc`` pools every labelled tile of the split. Over min–max scores that pool mixes two
    things a pathologist tells apart: does the model find the lesion *within* a tumour slide, and
    does it keep a normal slide quiet (min–max paints some tiles of every slide at 1)? So the two
    parts are reported too: ``instance_auc_positive_slides`` (pooled over slides with tumour tiles
    only) and ``negative_slide_alarm_share`` (share of tiles of tumour-free slides scoring ≥ the
    threshold). Given the bags' tumour probabilities, ``instance_auc_bag_weighted`` pools the
    scores times that probability (1 − P(class 0), class 0 being the tumour-free class of the
    tile-label convention): the same within-slide ranking, with a slide the model calls normal
    kept quiet. It scores the map ``pathopeft heatmap`` shows by default (min–max × the bag
    probability, ``gate: bag_probability``), where the plain pooled AUC scores a map nobody sees.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        self.auroc = BinaryAUROC()
        # binned (steps of 0.001 on the [0, 1] min–max scores): a fixed-size state, so a DDP rank that
        # saw no tumour slide syncs zeros instead of an empty list (a collective size mismatch)
        self.auroc_positive = BinaryAUROC(thresholds=1001)
        self.auroc_weighted = BinaryAUROC(thresholds=1001)
        self.weighted_seen = SumMetric()
        self.accuracy = BinaryAccuracy(threshold=threshold)
        self.f1 = BinaryF1Score(threshold=threshold)
        self.overlap = TileOverlap(threshold=threshold)
        self.labelled = SumMetric()
        self.positives = SumMetric()
        self.positive_slide_tiles = SumMetric()
        self.negative_tiles = SumMetric()
        self.negative_alarms = SumMetric()

    def update(
        self, scores: Tensor, tile_labels: Tensor, mask: Tensor, bag_positive: Tensor | None = None
    ) -> None:
        """``scores``/``tile_labels``/``mask`` are (B, N); a bag counts when all its tiles are labelled.

        ``bag_positive`` (B,) is each bag's tumour probability, for ``instance_auc_bag_weighted``.
        """
        weights = None if bag_positive is None else bag_positive.detach().float()
        for i, (s, y, m) in enumerate(zip(scores.detach().float(), tile_labels, mask)):
            y = y[m]
            if y.numel() == 0 or bool((y < 0).any()):
                continue
            s = s[m]
            y = y.long()
            if weights is not None:
                self.auroc_weighted.update((s * weights[i]).clamp(0, 1), y)
                self.weighted_seen.update(torch.tensor(1.0, device=s.device))
            self.auroc.update(s, y)
            self.accuracy.update(s, y)
            self.f1.update(s, y)
            self.overlap.update(s, y)
            self.labelled.update(torch.tensor(float(y.numel()), device=s.device))
            self.positives.update(y.sum().float())
            if bool(y.any()):
                self.auroc_positive.update(s, y)
                self.positive_slide_tiles.update(torch.tensor(float(y.numel()), device=s.device))
            else:
                self.negative_tiles.update(torch.tensor(float(y.numel()), device=s.device))
                self.negative_alarms.update((s >= self.threshold).sum().float())

    def compute(self) -> dict[str, Tensor]:
        """Empty when no labelled tile was seen on any rank (every rank must call this)."""
        labelled = float(self.labelled.compute())
        if labelled == 0:
            return {}
        positives = float(self.positives.compute())
        auc = self.auroc.compute()
        if positives in (0.0, labelled):  # one class only: the AUC is undefined
            auc = torch.tensor(float("nan"), device=auc.device)
        out = {
            "instance_auc": auc,
            "instance_accuracy": self.accuracy.compute(),
            "instance_f1": self.f1.compute(),
        }
        out.update(self.overlap.compute())
        nan = torch.tensor(float("nan"), device=auc.device)
        # defined when tumour slides were seen and they hold normal tiles too
        both = float(self.positive_slide_tiles.compute()) > positives > 0
        out["instance_auc_positive_slides"] = self.auroc_positive.compute() if both else nan
        if float(self.weighted_seen.compute()) > 0:  # every rank or none got bag probabilities
            weighted = self.auroc_weighted.compute()  # every rank computes (a collective)
            out["instance_auc_bag_weighted"] = weighted if 0 < positives < labelled else nan
        negatives = float(self.negative_tiles.compute())
        out["negative_slide_alarm_share"] = (
            self.negative_alarms.compute() / negatives if negatives > 0 else nan
        )
        return out

    def reset(self) -> None:
        for metric in (
            self.auroc, self.auroc_positive, self.auroc_weighted, self.weighted_seen, self.accuracy,
            self.f1, self.overlap, self.labelled, self.positives, self.positive_slide_tiles,
            self.negative_tiles, self.negative_alarms,
        ):  # fmt: skip
            metric.reset()


def best_threshold(probs: Tensor, labels: Tensor, fixed: float | None = None) -> tuple[float, float]:
    """``(threshold, balanced accuracy)`` for a two-class task's positive-class probabilities.

    Without ``fixed``: the threshold (midpoint between neighbouring probabilities) that maximises
    balanced accuracy, ties broken towards 0.5; with ``fixed``: that threshold's balanced accuracy.
    A split with one class only gives ``(0.5 or fixed, nan)``.
    """
    p = probs.detach().double().flatten().cpu()
    y = labels.detach().flatten().cpu() > 0.5
    if p.numel() == 0 or bool(y.all()) or not bool(y.any()):
        return (0.5 if fixed is None else float(fixed)), float("nan")

    def balanced(t: float) -> float:
        pred = p >= t
        return 0.5 * (
            float((pred & y).sum()) / float(y.sum()) + float((~pred & ~y).sum()) / float((~y).sum())
        )

    if fixed is not None:
        return float(fixed), balanced(float(fixed))
    values = torch.unique(p)
    candidates = [0.5] + [float(t) for t in (values[:-1] + values[1:]) / 2] + [float(values[0]) - 1e-9]
    best = max(candidates, key=lambda t: (balanced(t), -abs(t - 0.5)))
    return best, balanced(best)
