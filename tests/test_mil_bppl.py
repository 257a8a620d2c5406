"""BPPL against a small example computed by hand (METHODS.md, CoMEL "BPPL")."""

from __future__ import annotations

import math

import pytest
import torch

from pathopeft.mil.bppl import bppl_loss, confidence_correct, tau2_from_q

# Four instances in 2-D, attention a = [0.4, 0.1, 0.4, 0.1]:
#   positive prototype Σ a h                   = [0.8, 0.2]      (|p+| = √0.68)
#   negative prototype Σ (1-a) h / Σ (1-a)     = [1.2, 1.8] / 3 = [0.4, 0.6]   (|p-| = √0.52)
#   h=[1,0]: cos(p-) = 0.4/√0.52 = 0.554700, cos(p+) = 0.8/√0.68 = 0.970143
#            softmax([0.554700, 0.970143]) = [0.397611, 0.602389] → label 1, confidence 0.602389
#   h=[0,1]: cos(p-) = 0.6/√0.52 = 0.832050, cos(p+) = 0.2/√0.68 = 0.242536
#            softmax = [0.643258, 0.356742] → label 0, confidence 0.643258
H = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
A = torch.tensor([[0.4, 0.1, 0.4, 0.1]])
S = torch.tensor([[0.8, 0.3, 0.6, 0.1]])  # the localization scores the loss trains
CONFIDENT_TUMOUR = torch.tensor([[-3.0, 3.0]])  # p(tumour) = 0.997527 > τ₁
TUMOUR = torch.tensor([1])
NLL = [-math.log(0.8), -math.log(0.7), -math.log(0.6), -math.log(0.9)]  # y = [1, 0, 1, 0]


def test_hand_computed_pseudo_labels_and_loss_all_kept():
    out = bppl_loss(H, A, S, CONFIDENT_TUMOUR, TUMOUR, tau1=0.95, tau2=0.5)
    assert out.selected.tolist() == [True]
    assert out.pseudo_labels.tolist() == [[1, 0, 1, 0]]
    assert out.kept.tolist() == [4]
    assert out.loss.item() == pytest.approx(sum(NLL) / 4, abs=1e-5)  # = 0.299001


def test_tau2_drops_unsure_instances_and_scales_by_kept_over_n():
    # τ₂ = 0.62 keeps only the [0,1] instances (confidence 0.643 > 0.62 > 0.602)
    out = bppl_loss(H, A, S, CONFIDENT_TUMOUR, TUMOUR, tau1=0.95, tau2=0.62)
    assert out.pseudo_labels.tolist() == [[-1, 0, -1, 0]]
    assert out.kept.tolist() == [2]
    mean_over_kept = (NLL[1] + NLL[3]) / 2
    assert out.loss.item() == pytest.approx(mean_over_kept * 2 / 4, abs=1e-5)  # = 0.115509
    none = bppl_loss(H, A, S, CONFIDENT_TUMOUR, TUMOUR, tau1=0.95, tau2=0.65)
    assert none.kept.tolist() == [0] and none.loss.item() == 0.0


@pytest.mark.parametrize(
    ("logits", "label", "why"),
    [
        (torch.tensor([[3.0, -3.0]]), 0, "negative bag"),
        (torch.tensor([[-1.0, 1.0]]), 1, "confidence 0.881 < τ₁"),
        (torch.tensor([[3.0, -3.0]]), 1, "misclassified positive"),
    ],
)
def test_only_confident_correct_positive_bags_get_instance_loss(logits, label, why):
    out = bppl_loss(H, A, S, logits, torch.tensor([label]), tau1=0.95, tau2=0.5)
    assert out.selected.tolist() == [False], why
    assert out.loss.item() == 0.0 and out.kept.tolist() == [0]


def test_no_negative_class_makes_every_class_positive():
    out = bppl_loss(H, A, S, torch.tensor([[3.0, -3.0]]), torch.tensor([0]), negative_class=None)
    assert out.selected.tolist() == [True]


def test_gradient_flows_only_through_the_scores():
    h = H.clone().requires_grad_(True)
    a = A.clone().requires_grad_(True)
    s = S.clone().requires_grad_(True)
    logits = CONFIDENT_TUMOUR.clone().requires_grad_(True)
    bppl_loss(h, a, s, logits, TUMOUR, tau2=0.5).loss.backward()
    assert h.grad is None and a.grad is None and logits.grad is None  # targets carry no gradient
    # d/ds of Σ NLL / N: −1/(4s) for y=1, 1/(4(1−s)) for y=0
    expected = torch.tensor([[-1 / (4 * 0.8), 1 / (4 * 0.7), -1 / (4 * 0.6), 1 / (4 * 0.9)]])
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


def test_padding_is_ignored_and_batch_loss_is_the_mean_over_bags():
    h = torch.cat([H, torch.zeros(1, 4, 2)], dim=1).repeat(2, 1, 1)
    h[:, 4:] = torch.tensor([5.0, -5.0])  # padded garbage
    a = torch.cat([A, torch.zeros(1, 4)], dim=1).repeat(2, 1)
    s = torch.cat([S, torch.full((1, 4), 0.5)], dim=1).repeat(2, 1)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :4] = True
    logits = torch.cat([CONFIDENT_TUMOUR, torch.tensor([[3.0, -3.0]])])
    out = bppl_loss(h, a, s, logits, torch.tensor([1, 0]), mask, tau2=0.5)
    assert out.kept.tolist() == [4, 0]
    assert out.per_bag[0].item() == pytest.approx(sum(NLL) / 4, abs=1e-5)
    assert out.loss.item() == pytest.approx(sum(NLL) / 8, abs=1e-5)


def test_tau2_update_rule_and_q():
    assert tau2_from_q(0.0) == 0.5 and tau2_from_q(1.0) == 0.75
    assert tau2_from_q(0.6) == pytest.approx(0.65)
    with pytest.raises(ValueError):
        tau2_from_q(1.5)
    q = confidence_correct(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
    assert q.tolist() == pytest.approx([1 / (1 + math.exp(-2)), 0.0])


def test_scores_at_exactly_zero_or_one_give_finite_loss():
    s = torch.tensor([[0.0, 1.0, 1.0, 0.0]], requires_grad=True)  # worst case: every label opposite
    out = bppl_loss(H, A, s, CONFIDENT_TUMOUR, TUMOUR, tau2=0.5)
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert torch.isfinite(s.grad).all() and bool((s.grad != 0).all())  # the extremes still learn
