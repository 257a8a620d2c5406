"""BPPL: Bag-Prototype Pseudo-Labeling, CoMEL's instance-level loss (METHODS.md, CoMEL "BPPL").

For each *positive* bag that the model currently classifies correctly with confidence > τ₁:

* positive prototype ``p⁺ = Σ a_i h_i`` (the attention-pooled bag feature);
* negative prototype ``p⁻ = Σ (1 − a_i) h_i / Σ (1 − a_i)``;
* pseudo-label ``y_i = argmax softmax([cos(h_i, p⁻), cos(h_i, p⁺)] / T)`` (1 = tumour), kept only
  where that softmax's maximum exceeds τ₂ (and, with ``keep="positive"``, only where ``y_i = 1``);
  with ``center=True`` the midpoint ``(p⁺ + p⁻)/2`` is subtracted from ``h_i`` and both prototypes
  before the cosines (the authors' joint-training variant);
* loss ``(kept/N) · mean_kept −[y_i log s_i + (1 − y_i) log(1 − s_i)]`` with ``s_i`` the
  min–max-normalised attention (the localization score), i.e. the summed NLL over kept instances
  divided by the bag's N.

Negative bags and unselected bags give 0. Prototypes and pseudo-labels are targets: they are
computed from detached tensors, so the gradient flows only through ``s_i``. The batch loss is the
mean over the batch's bags (one bag per step by default, where this is the bag's loss).

Why the temperature and centring exist (METHODS.md): with ``T = 1`` and raw cosines the softmax
maximum of two values in [−1, 1] is at most σ(2) ≈ 0.881, and encoder features share a large common
offset, so both cosines are close and almost nothing passes τ₂. ``T = 1, center=False,
keep="both"`` is the published continual-code setting (:data:`PUBLISHED`).

τ₂ adapts per epoch: ``τ₂ = 0.5·(1 + 0.5·q)``, ``q`` = mean over the epoch's training bags of
(confidence in the true class × correct), so τ₂ ∈ [0.5, 0.75] (:func:`tau2_from_q`).

``s_i`` is squeezed affinely into [1e-6, 1 − 1e-6] before the logarithms: min–max normalisation
puts an exact 0 and 1 in every bag, where the NLL of the opposite label would be infinite; unlike a
clamp, the squeeze keeps those two instances' gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PUBLISHED", "SHIPPED", "BPPLOutput", "bppl_loss", "confidence_correct", "tau2_from_q"]

SCORE_EPS = 1e-6

# The authors' continual-code setting: raw cosines, no centring, both labels kept, τ₁ = 0.95.
PUBLISHED: dict[str, float | bool | str] = {"temperature": 1.0, "center": False, "keep": "both", "tau1": 0.95}
# The shipped defaults (``bppl.*`` left unset), chosen by benchmarks/bench_bppl.py (RESULTS.md,
# "Localization"): on small synthetic bags, 3 seeds, T = 0.1 keeps pseudo-labels in ~95 % of the
# selected bags' tiles and lifts CoMEL's instance AUC from 0.57 (BPPL off) and 0.67 (published) to
# 0.87; centring, positive-only labels, T = 0.05 and T = 1 with centring were not better.
SHIPPED: dict[str, float | bool | str] = {"temperature": 0.1, "center": False, "keep": "both"}


@dataclass
class BPPLOutput:
    loss: Tensor  # scalar, mean over the batch's bags
    per_bag: Tensor  # (B,) each bag's loss (0 where not selected)
    selected: Tensor  # (B,) bool: positive, correct, confidence > τ₁
    kept: Tensor  # (B,) long: instances whose pseudo-label passed τ₂
    pseudo_labels: Tensor  # (B, N) long: 1/0 where kept, -1 elsewhere


def confidence_correct(logits: Tensor, labels: Tensor) -> Tensor:
    """Per bag: softmax probability of the true class if the prediction is correct, else 0."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    confidence = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    correct = probs.argmax(dim=-1) == labels
    return confidence * correct


def tau2_from_q(q: float | Tensor) -> float:
    """τ₂ = 0.5·(1 + 0.5·q) for q ∈ [0, 1] (METHODS.md)."""
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    return 0.5 * (1.0 + 0.5 * q)


def bppl_loss(
    features: Tensor,
    attention: Tensor,
    scores: Tensor,
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    tau1: float = 0.95,
    tau2: float = 0.5,
    negative_class: int | None = 0,
    temperature: float = 1.0,
    center: bool = False,
    keep: str = "both",
) -> BPPLOutput:
    """The BPPL loss of a batch (shapes: features (B,N,E), attention/scores (B,N), logits (B,C)).

    ``negative_class`` is the index of the class whose bags are negative (no instance loss);
    ``None`` treats every class as positive (e.g. subtyping, where every slide holds tumour).
    ``temperature`` divides the two cosines before the softmax; ``center`` subtracts the prototypes'
    midpoint first; ``keep`` is ``"both"`` (tumour and normal pseudo-labels) or ``"positive"``.
    """
    if temperature <= 0:
        raise ValueError(f"bppl temperature must be positive, got {temperature}")
    if keep not in ("both", "positive"):
        raise ValueError(f"bppl keep must be 'both' or 'positive', got {keep!r}")
    b, n = attention.shape
    valid = torch.ones((b, n), dtype=torch.bool, device=attention.device) if mask is None else mask.bool()
    probs = torch.softmax(logits.detach().float(), dim=-1)
    confidence = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    correct = probs.argmax(dim=-1) == labels
    positive = torch.ones_like(correct) if negative_class is None else labels != negative_class
    selected = positive & correct & (confidence > tau1) & (valid.sum(dim=1) >= 2)

    h = features.detach().float()
    a = attention.detach().float().masked_fill(~valid, 0.0)
    pos_proto = torch.einsum("bn,bne->be", a, h)
    inv = (1.0 - a).masked_fill(~valid, 0.0)
    neg_proto = torch.einsum("bn,bne->be", inv, h) / inv.sum(dim=1, keepdim=True).clamp_min(1e-12)
    if center:
        mid = 0.5 * (pos_proto + neg_proto)
        h = h - mid.unsqueeze(1)
        pos_proto, neg_proto = pos_proto - mid, neg_proto - mid
    cos_neg = F.cosine_similarity(h, neg_proto.unsqueeze(1), dim=-1)
    cos_pos = F.cosine_similarity(h, pos_proto.unsqueeze(1), dim=-1)
    soft = torch.softmax(torch.stack([cos_neg, cos_pos], dim=-1) / temperature, dim=-1)  # (B, N, 2)
    confidence_i, pseudo = soft.max(dim=-1)
    kept = (confidence_i > tau2) & valid & selected.unsqueeze(1)
    if keep == "positive":
        kept = kept & (pseudo == 1)

    s = SCORE_EPS + (1.0 - 2.0 * SCORE_EPS) * scores.float()
    target = pseudo.to(s.dtype)
    nll = -(target * torch.log(s) + (1.0 - target) * torch.log1p(-s))
    n_valid = valid.sum(dim=1).clamp_min(1).to(s.dtype)
    per_bag = (nll * kept).sum(dim=1) / n_valid  # = mean over kept × kept/N
    pseudo_labels = torch.where(kept, pseudo, torch.full_like(pseudo, -1))
    return BPPLOutput(
        loss=per_bag.mean(),
        per_bag=per_bag,
        selected=selected,
        kept=kept.sum(dim=1),
        pseudo_labels=pseudo_labels,
    )
