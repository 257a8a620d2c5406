"""Instance metrics split into within-tumour-slide localization and quiet normal slides."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_auroc

from pathopeft.mil.metrics import InstanceMetrics


def _update(
    metrics: InstanceMetrics,
    scores: list[list[float]],
    labels: list[list[int]],
    bag_positive: list[float] | None = None,
) -> None:
    n = max(len(s) for s in scores)
    s = torch.zeros(len(scores), n)
    y = torch.full((len(scores), n), -1)
    m = torch.zeros(len(scores), n, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(scores, labels)):
        s[i, : len(a)], y[i, : len(b)], m[i, : len(a)] = torch.tensor(a), torch.tensor(b), True
    metrics.update(s, y, m, bag_positive=None if bag_positive is None else torch.tensor(bag_positive))


def test_positive_slide_auc_and_negative_alarms_are_reported_apart():
    # a tumour slide ranked perfectly within itself, and a normal slide that min-max painted hot
    tumour = ([0.9, 1.0, 0.2, 0.0], [1, 1, 0, 0])
    normal = ([1.0, 0.95, 0.6, 0.0], [0, 0, 0, 0])
    metrics = InstanceMetrics(0.5)
    _update(metrics, [tumour[0], normal[0]], [tumour[1], normal[1]])
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["instance_auc_positive_slides"] == 1.0
    assert out["negative_slide_alarm_share"] == 0.75
    pooled = binary_auroc(torch.tensor(tumour[0] + normal[0]), torch.tensor(tumour[1] + normal[1]))
    assert out["instance_auc"] == float(pooled) < 1.0  # the pool is hurt by the normal slide only


def test_split_metrics_are_nan_where_undefined():
    metrics = InstanceMetrics(0.5)
    _update(metrics, [[0.1, 0.7]], [[0, 0]])  # normal slides only
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert math.isnan(out["instance_auc_positive_slides"]) and out["negative_slide_alarm_share"] == 0.5
    metrics.reset()
    _update(metrics, [[0.1, 0.7], [0.2, 0.9]], [[0, 1], [1, 1]])  # tumour slides only
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["instance_auc_positive_slides"] == 1.0 and math.isnan(out["negative_slide_alarm_share"])


def test_bag_weighted_auc_quiets_a_slide_the_model_calls_normal():
    tumour = ([0.9, 1.0, 0.2, 0.0], [1, 1, 0, 0])
    normal = ([1.0, 0.95, 0.6, 0.0], [0, 0, 0, 0])
    metrics = InstanceMetrics(0.5)
    _update(metrics, [tumour[0]], [tumour[1]])
    assert "instance_auc_bag_weighted" not in metrics.compute()  # no bag probabilities given
    metrics.reset()
    _update(metrics, [tumour[0], normal[0]], [tumour[1], normal[1]], bag_positive=[0.9, 0.05])
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["instance_auc"] < 1.0 and out["instance_auc_bag_weighted"] == 1.0
    metrics.reset()  # a model that calls the normal slide tumour gains nothing
    _update(metrics, [tumour[0], normal[0]], [tumour[1], normal[1]], bag_positive=[0.9, 0.95])
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["instance_auc_bag_weighted"] < 1.0
